"""mil_jax: autoencoders pretrained on CIFAR and probed by classifiers, in JAX/Flax."""

__version__ = '0.1.0'
