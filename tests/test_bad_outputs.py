"""Outputs that would overwrite what the tools did not write: refused, nothing touched (issue 27, items 1-2).

The rows cover evaluate's --out, predict's --output and its --cam overlay folder.

Every row below gets its own copy of the reference run's workdir (made able
to read slices, so that a tool that did not refuse would go on and write) and
its own small folder of slices; all rows launch in one process
(launch_batch.py). Each row asserts the exit status, the one `Error:` line
naming the path, and that every file under its folder (inputs, workdir, the
--out/--output target) is byte-identical afterwards, with nothing added. What
the tools may replace (their own reports and CSVs) is tested here in-process
and, end to end, in test_evaluate_data.py and test_predict.py.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import launch_batch

from dsn_saal_jax import console, folder_eval, predict, reporting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_REFUSED = "is, holds or lies inside the folder being evaluated"
WORKDIR_REFUSED = "is, holds or lies inside the run's own files"
NOT_OURS = "is not a report folder this tool wrote"
NOT_A_CSV = "exists and is not a predictions CSV this tool wrote"


@pytest.fixture(scope="module")
def workdir(reference, tmp_path_factory):
  """A copy of the reference run whose checkpoints' specs record file preprocessing, so that it can read slices.

  The run trained on in-memory arrays, and a spec without normalization makes
  predictions fail before any output is written: the refusals would then be
  untested. With it, a tool that did not refuse would go on and write.
  """
  work = tmp_path_factory.mktemp("workdir") / "work"
  shutil.copytree(reference[1], work)
  for meta in work.glob("*/*/meta/metadata"):
    data = json.loads(meta.read_text())
    data["inference"]["normalization"] = {"scale": 255.0, "mean": [0.449], "std": [0.226],
                                          "resize": "bilinear_antialias", "channels": 1}
    meta.write_text(json.dumps(data))
  return work


def make_row(root, workdir):
  """A row's folder: data/<class>/ slices (the reference run's classes), a copy of the workdir, a user's files."""
  for label, name in enumerate(("normal", "pneumonia", "covid")):
    (root / "data" / name).mkdir(parents=True)
    for k in range(2):
      Image.fromarray(np.full((40, 40), 40 * label + k, np.uint8)).save(root / "data" / name / f"s{k}.png")
  shutil.copytree(workdir, root / "work")
  (root / "mine").mkdir()
  (root / "mine" / "notes.txt").write_text("a user's notes")
  (root / "mine" / "results.csv").write_text("patient,finding\n1,clear\n")


# Each row: (script, args), with {data}, {work}, {mine} the row's folders; the Error line's expected text.
ROWS = {
    # evaluate.py --data --out=...
    "out_is_the_data_folder": (("evaluate.py", "--data={data}", "--out={data}"), DATA_REFUSED),
    "out_inside_the_data_folder": (("evaluate.py", "--data={data}", "--out={data}/report"), DATA_REFUSED),
    "out_holds_the_data_folder": (("evaluate.py", "--data={data}", "--out={root}"), DATA_REFUSED),
    "out_is_the_workdir": (("evaluate.py", "--data={data}", "--out={work}"), WORKDIR_REFUSED),
    "out_is_the_checkpoints": (("evaluate.py", "--data={data}", "--out={work}/checkpoints"), WORKDIR_REFUSED),
    "out_inside_best": (("evaluate.py", "--data={data}", "--out={work}/best/new"), WORKDIR_REFUSED),
    "out_is_the_report_folder": (("evaluate.py", "--data={data}", "--out={work}/report"), WORKDIR_REFUSED),
    "out_holds_a_users_file": (("evaluate.py", "--data={data}", "--out={mine}"), NOT_OURS),
    "out_is_an_existing_file": (("evaluate.py", "--data={data}", "--out={mine}/notes.txt"), "is an existing file"),
    "out_is_trainings_report": (("evaluate.py", "--data={data}", "--out={work}/report/test"),
                                "is the report of a split of the run's own dataset"),
    "out_is_a_report_with_a_users_file": (("evaluate.py", "--data={data}", "--out={work}/report/test"), NOT_OURS),
    "out_is_a_report_edited_since": (("evaluate.py", "--data={data}", "--out={work}/report/test"),
                                     "gradcam.png changed since the report was written"),
    # evaluate.py --config: its report folder, WORKDIR/report/test_best, holds a user's file
    "config_report_holds_a_users_file": (("evaluate.py", f"--config={REPO}/configs/default.py", "--split=test"),
                                         NOT_OURS),
    # train.py: its final report folder, WORKDIR/report/test, holds a user's file: refused before any step
    "train_report_holds_a_users_file": (("train.py", f"--config={REPO}/configs/default.py"), NOT_OURS),
    # predict.py --output=...
    "output_is_the_input": (("predict.py", "--output={data}/normal/s0.png", "{data}/normal/s0.png"),
                            "is one of the inputs"),
    "output_is_in_an_input_folder": (("predict.py", "--output={data}/covid/s1.png", "{data}"), "is one of the inputs"),
    "output_slip_takes_a_slice": (("predict.py", "--output", "{data}/normal/s0.png", "{data}/normal/s1.png"),
                                  NOT_A_CSV),
    "output_is_a_users_csv": (("predict.py", "--output={mine}/results.csv", "{data}"), NOT_A_CSV),
    "output_is_a_folder": (("predict.py", "--output={mine}", "{data}"), "is a folder; --output names the CSV file"),
    "output_is_a_link": (("predict.py", "--output={root}/link.csv", "{data}"), "is a symbolic link"),
    # predict.py --cam=...: an overlay would replace a user's file, or join the slices
    "cam_holds_a_users_file": (("predict.py", "--output={root}/p.csv", "--cam={mine}", "{data}"),
                               "exists and is not an overlay this tool wrote"),
    "cam_inside_the_inputs": (("predict.py", "--output={root}/p.csv", "--cam={data}/cams", "{data}"),
                              "is, holds or lies inside the input folder"),
}
PREPARE = {  # changes a row's folder before the launch, as a user would have
    "out_is_a_report_with_a_users_file": lambda r: (r / "work" / "report" / "test" / "notes.txt").write_text("mine"),
    "out_is_a_report_edited_since": lambda r: (r / "work" / "report" / "test" / "gradcam.png").write_bytes(b"edited"),
    "config_report_holds_a_users_file": lambda r: ((r / "work" / "report" / "test_best").mkdir(exist_ok=True),
                                                   (r / "work" / "report" / "test_best" / "mine.txt").write_text("x")),
    "output_is_a_link": lambda r: (r / "link.csv").symlink_to(r / "mine" / "results.csv"),
    "cam_holds_a_users_file": lambda r: ((r / "mine" / "normal").mkdir(),
                                         (r / "mine" / "normal" / "s0.png.png").write_bytes(b"a user's figure")),
    "train_report_holds_a_users_file": lambda r: (r / "work" / "report" / "test" / "notes.txt").write_text("mine"),
}


def tree_hashes(root):
  """{relative path: sha256} of every file under `root` (links as their target path), folders as None."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), root)] = None
    for name in filenames:
      path = os.path.join(dirpath, name)
      rel = os.path.relpath(path, root)
      if os.path.islink(path):
        out[rel] = "link:" + os.readlink(path)
      else:
        with open(path, "rb") as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def launched(workdir, tmp_path_factory):
  """{row: (launch result, hashes before, hashes after)}, all rows launched in one process."""
  tmp = tmp_path_factory.mktemp("bad_outputs")
  invocations, before = [], {}
  for name, ((script, *args), _) in ROWS.items():
    root = tmp / name
    make_row(root, workdir)
    PREPARE.get(name, lambda r: None)(root)
    fields = dict(root=root, data=root / "data", work=root / "work", mine=root / "mine")
    invocations.append([script, f"--workdir={root / 'work'}", *(a.format(**fields) for a in args)])
    before[name] = tree_hashes(root)
  (tmp / "cwd").mkdir()
  results = launch_batch.run(invocations, tmp / "cwd")
  return {name: (result, before[name], tree_hashes(tmp / name)) for name, result in zip(ROWS, results)}


@pytest.mark.parametrize("row", list(ROWS))
def test_refused_by_name_with_nothing_touched(launched, row):
  proc, before, after = launched[row]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr[-3000:]
  error = proc.stderr.strip().splitlines()[-1]
  assert error.startswith("Error: ") and ROWS[row][1] in error, error
  assert f"/{row}/" in error, error  # names the path (every path of the row lies in its folder)
  assert before == after  # every file byte-identical, nothing added or removed


def test_reports_of_ours_and_of_earlier_versions_may_be_replaced_others_not(workdir, tmp_path):
  """check_report_dir: the rule write_report applies before replacing a folder."""
  report = tmp_path / "test"
  shutil.copytree(workdir / "report" / "test", report)  # as train.py's write_report wrote it
  manifest = json.loads((report / reporting.MANIFEST).read_text())
  assert sorted(manifest["sha256"]) == ["confusion_matrix.png", "gradcam.png", "metrics.json", "roc.png"]
  reporting.check_report_dir(str(report))  # unchanged: a rerun replaces it
  reporting.check_report_dir(str(tmp_path / "new"))
  (tmp_path / "empty").mkdir()
  reporting.check_report_dir(str(tmp_path / "empty"))
  (report / reporting.MANIFEST).unlink()  # a report written before manifests: only report files, so ours
  reporting.check_report_dir(str(report))
  (report / "predictions.csv").write_text("id\n")  # evaluate --data's CSV is a report file too
  reporting.check_report_dir(str(report))
  (report / "metrics.json").write_text(json.dumps({"accuracy": 1.0}))  # but not a metrics.json of anything else
  with pytest.raises(reporting.ReportDirError, match="its metrics.json is not a report's"):
    reporting.check_report_dir(str(report))
  (tmp_path / "user").mkdir()
  (tmp_path / "user" / "roc.png").write_bytes(b"a user's figure")
  with pytest.raises(reporting.ReportDirError, match="has no report's metrics.json"):
    reporting.check_report_dir(str(tmp_path / "user"))
  # evaluate --data's own checks, in-process: a new folder inside the workdir (not its own folders) is fine.
  folder_eval.check_out_dir(str(workdir / "eval_b"), str(tmp_path / "data"), str(workdir))
  folder_eval.check_out_dir(str(workdir / "report" / "data_b"), str(tmp_path / "data"), str(workdir))


def test_predict_replaces_only_its_own_csv(tmp_path):
  ours = tmp_path / "preds.csv"
  ours.write_text("path,prediction,prob_normal,prob_covid,error\na.png,normal,0.9,0.1,\n")
  predict.check_output(str(ours), [str(tmp_path / "a.png")])  # a rerun replaces it
  predict.check_output(str(tmp_path / "new" / "preds.csv"), [])
  evaluate_csv = tmp_path / "eval.csv"
  evaluate_csv.write_text("id,true_class,path,prediction,prob_normal,error\n")
  with pytest.raises(predict.OutputError, match="is not a predictions CSV this tool wrote"):
    predict.check_output(str(evaluate_csv), [])


def test_progress_goes_to_the_log_with_rate_and_eta_never_to_stdout(caplog, capsys):
  with caplog.at_level("INFO"):
    assert list(console.progress(iter(range(5)), 5, "files", every_s=0)) == list(range(5))
  lines = [r.getMessage() for r in caplog.records]
  assert lines[0].startswith("1/5 files (20%)") and "files/s, ETA 0:00:00" in lines[0]
  assert lines[-2].startswith("5/5 files (100%)") and lines[-1].startswith("5/5 files in")
  assert capsys.readouterr().out == ""
  caplog.clear()
  with caplog.at_level("INFO"):
    list(console.progress(iter(range(5)), 5, "files"))  # a short run: silent
  assert not caplog.records
