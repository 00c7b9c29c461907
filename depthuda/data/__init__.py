"""Datasets: label spaces, the procedural toy, TFDS builders and tf.data input.

`labels` and `toy` are NumPy-only; `synthia`, `cityscapes` and `pipeline`
import TensorFlow and are used only by the stages.
"""
