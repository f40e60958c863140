"""Distillation's core, without Lightning: the losses (logit KD, SquareHead), the blocks SquareHead pairs,
the capture of one student forward and the teacher's, and the teacher (built, loaded, sharded like an FSDP2
student). :class:`lightning_prune.Distillation` (``callbacks/distill.py``) is the Lightning adapter over it."""
