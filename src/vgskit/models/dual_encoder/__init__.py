"""The compact from-scratch dual encoder (``dual_encoder``, ``dual_encoder_tiny``): the worked example of a
model family (see ``docs/adding_a_model_family.md``)."""

from vgskit.models.dual_encoder.model import DualEncoder, DualEncoderConfig, sinusoidal_positions

__all__ = ["DualEncoder", "DualEncoderConfig", "sinusoidal_positions"]
