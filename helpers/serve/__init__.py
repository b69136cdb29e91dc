"""Answers of a trained model: the one answer path, the ONNX engine, exports and the phone app."""
