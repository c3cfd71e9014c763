"""nodata-defense: certifiable l2 robustness for pretrained image classifiers without their data."""

__version__ = "0.1.0"
