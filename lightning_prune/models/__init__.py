"""What the library knows about model architectures: the structures a layer spans (``graph``) and
how a Hugging Face config describes a model's sizes (``hf_config``)."""
