"""ensemble-kd: compress an ensemble of neural networks into one network."""

__version__ = "0.1.0"
