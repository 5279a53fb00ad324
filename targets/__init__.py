"""Lowering of adapted models (installed as ``adaptc.targets``): merge and ONNX export come here."""
