"""Convert a torchvision weights file into a checkpoint the trainer starts from.

  python launch/convert_torchvision.py --arch vgg16_bn --weights vgg16_bn-6c64b313.pth \
      --output /tmp/vgg16_bn_gray --in_channels 1 --num_classes 3

Then train with `--config.backbone=vgg16_bn --config.init_checkpoint=/tmp/vgg16_bn_gray`. The weights file
is read with torch.load(weights_only=True): a file that pickles code is refused.
"""

import sys

from dsn_saal_jax import cli

cli.setup(sys.argv)

# pylint: disable=wrong-import-position
from absl import app, flags

from dsn_saal_jax import convert, models

FLAGS = flags.FLAGS
flags.DEFINE_enum("arch", "vgg16_bn", models.list_models(), "torchvision architecture of the weights file.")
flags.DEFINE_string("weights", None, "torchvision state_dict file (.pth) of --arch.", required=True)
flags.DEFINE_string("output", None, "Directory for the converted Orbax checkpoint (must not exist).", required=True)
flags.DEFINE_enum("in_channels", "3", ["1", "3"], "Input channels of the model; 1 sums the first conv over RGB.")
flags.DEFINE_integer("num_classes", 1000, "Classes of the model; != 1000 leaves the last Linear to the trainer.")


def main(argv):
  del argv
  with cli.usage_errors(ValueError, OSError):  # a refused or unreadable weights file, an existing --output
    variables = convert.torchvision_variables(
        convert.load_torch_state_dict(FLAGS.weights), FLAGS.arch, int(FLAGS.in_channels), FLAGS.num_classes)
    convert.save_pretrained(FLAGS.output, variables)
  kept = "kept" if FLAGS.num_classes == 1000 else "left to the trainer (new classes)"
  print(f"Wrote {FLAGS.output}: {FLAGS.arch} for {FLAGS.in_channels}-channel input; last Linear {kept}.")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
