"""trainer_pkg: fine-tune BERT text classifiers with Hugging Face Accelerate."""

__version__ = "0.1.0"
