"""PSF models (:mod:`.models`) and PSF estimation from an exposure's own stars (:mod:`.estimate`)."""
from . import models
from .models import *  # noqa: F401,F403 - the models are the package's surface

__all__ = list(models.__all__)
