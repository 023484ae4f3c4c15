"""Models with scvi-tools' interface: setup, construct, train, embed, save and load."""

from ._multivae import MULTIVAE, TOTALVI
from ._scanvi import SCANVI
from ._scvi import SCVI

__all__ = ["MULTIVAE", "SCANVI", "SCVI", "TOTALVI"]
