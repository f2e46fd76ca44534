"""krtfuap: universal adversarial perturbations against face recognition."""

__version__ = "0.1.0"
