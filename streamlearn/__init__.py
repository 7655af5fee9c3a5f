"""streamlearn: an online-learning agent for IoT gateways."""

__version__ = "0.1.0"
