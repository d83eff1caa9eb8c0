"""e1min: fine-tune Profluent's E1 to predict metal-binding residues."""

__version__ = "0.1.0"
