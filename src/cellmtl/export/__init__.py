"""Hand a trained model to other tools: `onnx` (the network as an ONNX graph with cellmtl's metadata) and
`bioimageio` (a bioimage.io 0.5 model package built on that graph)."""
