"""Model surgery: pruned models made smaller (``shrink``, ``depth``, ``experts``), 2:4 export
(``export``) and LoRA merged into pruned weights (``lora``)."""
