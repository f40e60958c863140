"""The pruning engine: a pruner's plan and state, a round top to bottom, and ``prune()``.

Torch and numpy only. ``pruner`` (plan and masks), ``round`` (``run_round``, ``prune``), ``rounds``
(round strategies: one pass, block by block), ``sequential`` (the block-by-block loop), ``schedule``,
``selection`` (scores -> masks), ``masks`` (the only code that zeroes weights), ``targets``,
``calibration`` (where a loss comes from), ``summary``.
"""
