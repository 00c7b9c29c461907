"""depthuda: domain adaptation for semantic segmentation using depth distribution."""
