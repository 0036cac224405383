"""The images every model and data split holds: CIFAR's 32x32 RGB."""
IMAGE_SHAPE = (32, 32, 3)  # height, width, channels
IMAGE_SIZE = IMAGE_SHAPE[0]
