"""What the library knows about model architectures: where each architecture's parts live (``layouts``, the
registry), the structures a layer spans (``graph``) and how a Hugging Face config describes a model's sizes
(``hf_config``)."""
