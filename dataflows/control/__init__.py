"""The control stream: contracts and model descriptors, checked and installed per data type."""
