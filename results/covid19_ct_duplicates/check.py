"""The near-duplicate criterion (dsn_saal_jax/data/builders/duplicates.py) on the real COVID19-CT.

  python results/covid19_ct_duplicates/check.py                        # both builder configs, 20 closest pairs
  python results/covid19_ct_duplicates/check.py --montage=/tmp/dups    # and PNGs of those pairs, to look at

Builds covid19_ct's `original` and `lung_mask` configs under --data_dir (once; ~1 min each on 2 cores) as
the pipeline does, then prints per config: the exact and near groups of duplicates.json, how many cross
splits and how many mix the classes; how the thumbnail distance of all pairs of slices is distributed
around duplicates.NEAR_MAX_DIFFERENCE; the --closest pairs, flagged or not. --montage writes each config's
closest pairs side by side (stored slices, as the model sees them); keep it outside the repository.
"""

import argparse
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from dsn_saal_jax.data import builders
from dsn_saal_jax.data.builders import duplicates

BINS = (0.0, 0.05, duplicates.NEAR_MAX_DIFFERENCE, 0.1, 0.15, 0.2, 0.3, 0.5, np.inf)


def slices(builder):
  """(split, id, label, stored image (H, W)) of every example, in the report's split order."""
  names = builder.info.features["label"].names
  return [(split, ex["id"].decode(), names[ex["label"]], ex["image"][:, :, 0])
          for split in duplicates.split_order(builder.info.splits) for ex in builder.as_data_source(split)]


def montage(pairs, items, path, height=220):
  """Each pair side by side (resized to `height`), one pair a row, captioned with split, id and distance."""
  rows = []
  for i, j, d in pairs:
    tiles = [Image.fromarray(items[k][3]) for k in (i, j)]
    tiles = [t.resize((round(t.width * height / t.height), height)) for t in tiles]
    row = Image.new("L", (sum(t.width for t in tiles) + 10, height + 14))
    caption = f"{d:.3f}  {items[i][0]}:{items[i][1]}  |  {items[j][0]}:{items[j][1]}"
    ImageDraw.Draw(row).text((2, 1), caption, fill=255)
    row.paste(tiles[0], (0, 14))
    row.paste(tiles[1], (tiles[0].width + 10, 14))
    rows.append(row)
  sheet = Image.new("L", (max(r.width for r in rows), sum(r.height + 6 for r in rows)))
  for k, row in enumerate(rows):
    sheet.paste(row, (0, sum(r.height + 6 for r in rows[:k])))
  sheet.save(path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--manual_dir", default=builders.default_manual_dir("covid19_ct"),
                      help="the upstream COVID-CT folder (default: the shared copy)")
  parser.add_argument("--data_dir", default="/tmp/covid19_ct_duplicates", help="where the TFDS builds go")
  parser.add_argument("--closest", type=int, default=20, help="how many of the closest pairs to list")
  parser.add_argument("--montage", default="", help="a folder for PNGs of the closest pairs (none if empty)")
  args = parser.parse_args()
  if not args.manual_dir or not os.path.isdir(args.manual_dir):
    parser.error(f"Error: COVID-CT not found at {args.manual_dir!r}; pass --manual_dir=<its upstream folder>.")
  tfds.disable_progress_bar()
  for config in ("original", "lung_mask"):
    builder = builders.Covid19Ct(data_dir=args.data_dir, config=config)
    builders.prepare(builder, args.manual_dir)
    report = duplicates.ensure(builder)
    print(f"== covid19_ct/{config}: {report['splits']}, duplicates.json format {report['format']}")
    for kind in ("exact", "near"):
      part = report[kind]
      cross = {pair: stats["groups"] for pair, stats in part["cross_split"].items()}
      crossing = sum(g["cross_split"] for g in part["groups"])
      print(f"{kind}: {len(part['groups'])} group(s), {crossing} across splits {cross}, "
            f"{part['label_conflicts']} mixing classes")
      for g in part["groups"]:
        print("  " + " = ".join(f"{m['split']}:{m['id']} ({m['label']})" for m in g["members"]))
    items = slices(builder)
    thumbs = np.stack([duplicates.thumbnail(image[:, :, None]) for *_, image in items]).astype(np.float64)
    flat = thumbs.reshape(len(thumbs), -1)
    i, j = np.triu_indices(len(thumbs), 1)
    distance = np.concatenate([np.abs(flat[a] - flat[a + 1:]).mean(-1) for a in range(len(flat) - 1)])
    counts, _ = np.histogram(distance, BINS)
    bins = ", ".join(f"[{lo:g}, {hi:g}) {n}" for lo, hi, n in zip(BINS[:-1], BINS[1:], counts))
    print(f"all {len(distance)} pairs by thumbnail distance (limit {duplicates.NEAR_MAX_DIFFERENCE}): {bins}")
    flagged = {frozenset((m["split"], m["id"]) for m in g["members"]) for g in report["near"]["groups"]}
    closest = np.argsort(distance, kind="stable")[: args.closest]
    print(f"the {args.closest} closest pairs (* in one near group):")
    for k in closest:
      a, b = items[i[k]], items[j[k]]
      mark = "*" if any({(a[0], a[1]), (b[0], b[1])} <= g for g in flagged) else " "
      print(f" {mark} {distance[k]:.3f}  {a[0]}:{a[1]} ({a[2]})  {b[0]}:{b[1]} ({b[2]})")
    if args.montage:
      os.makedirs(args.montage, exist_ok=True)
      path = os.path.join(args.montage, f"closest_{config}.png")
      montage([(i[k], j[k], distance[k]) for k in closest], items, path)
      print(f"wrote {path}")


if __name__ == "__main__":
  main()
