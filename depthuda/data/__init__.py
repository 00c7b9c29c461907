"""Datasets: label spaces, the procedural toy, dataset readers and tf.data input.

`labels`, `toy`, `toy_scene` and `mapillary` need only NumPy and PIL; `synthia`,
`cityscapes`, `pipeline` and `bad_files` (the file behind a decoding failure) import TensorFlow
and are used only by the stages.
"""
