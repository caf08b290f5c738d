"""pilimit: infinite-width π-networks (Yang, Santacroce & Hu, ICLR 2022) in PyTorch."""
__version__ = "0.1.0"
