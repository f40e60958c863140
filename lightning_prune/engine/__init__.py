"""The pruning engine: a pruner's plan and state, a round top to bottom, and ``prune()``.

Torch and numpy only. ``pruner`` (plan and state) with its parts ``binding`` (targets and masks on a
model), ``maskstate`` (masks that only shrink), ``checkpoint`` (the state format); ``round``
(``run_round``, ``prune``), ``record`` (``RoundRecord``), ``oneshot`` (``prune()``'s plan for the
defaults), ``rounds`` (round strategies: one pass, block by block), ``sequential`` (the block-by-block
loop), ``schedule``, ``selection`` (scores -> masks), ``masks`` (the only code that zeroes weights),
``targets``, ``calibration`` (where a loss comes from), ``summary``.
"""
