"""Trains a classifier over a pretrained encoder: python train_classifier.py --mode probing"""
from mil_jax import cli


def main(argv: list[str]) -> None:
  del argv
  cli.fail('train_classifier.py is not implemented yet.')


if __name__ == '__main__':
  cli.run(main)
