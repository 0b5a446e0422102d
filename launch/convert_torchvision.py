"""Convert a torchvision `vgg16_bn` weights file into a checkpoint the trainer starts from.

  python launch/convert_torchvision.py --weights vgg16_bn-6c64b313.pth \
      --output /tmp/vgg16_bn_gray --in_channels 1 --num_classes 3

Then train with `--config.init_checkpoint=/tmp/vgg16_bn_gray`. The weights file
is read with torch.load(weights_only=True): a file that pickles code is refused.
"""

from absl import app, flags

from dsn_saal_jax import convert

FLAGS = flags.FLAGS
flags.DEFINE_string("weights", None, "torchvision vgg16_bn state_dict file (.pth).", required=True)
flags.DEFINE_string("output", None, "Directory for the converted Orbax checkpoint (must not exist).", required=True)
flags.DEFINE_enum("in_channels", "3", ["1", "3"], "Input channels of the model; 1 sums the first conv over RGB.")
flags.DEFINE_integer("num_classes", 1000, "Classes of the model; != 1000 leaves the last Linear to the trainer.")


def main(argv):
  del argv
  variables = convert.torchvision_variables(
      convert.load_torch_state_dict(FLAGS.weights), int(FLAGS.in_channels), FLAGS.num_classes)
  convert.save_pretrained(FLAGS.output, variables)
  kept = "kept" if FLAGS.num_classes == 1000 else "left to the trainer (new classes)"
  print(f"Wrote {FLAGS.output}: vgg16_bn for {FLAGS.in_channels}-channel input; last Linear {kept}.")


if __name__ == "__main__":
  app.run(main)
