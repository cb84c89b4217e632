"""Executes every notebook top to bottom with nbclient, in quick mode, as CI does: a cell that raises fails
the notebook's test, and so does an output of 01-06 that lacks what the notebook explains (EXPECTED).
Also checks that the committed notebooks are valid, small and free of error outputs, and that every number their
markdown quotes from an output is printed by that output (QUOTED).

Quick mode (NOTEBOOK_QUICK=1) shrinks the data, models and epochs (06 draws the committed
bench/results/ablations.json in both modes); all six notebooks take about 90 seconds on a 2-core CPU. The kernel runs with one OpenMP thread unless OMP_NUM_THREADS is set: the notebooks' tensors
are small, and when another process keeps a core busy, a second OpenMP thread makes every small op wait
several milliseconds at the thread barrier (measured here: an MVAD training step of 14 s with 2 threads
against 0.5 s with 1).
"""
import dataclasses
import importlib
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_multiview_data", "02_mvas", "03_complexity", "04_idif", "05_training", "06_ablations"]
CELL_TIMEOUT = 600  # seconds per cell; quick mode needs under 30


def test_the_six_notebooks_are_there():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_saved_notebook_is_valid_small_and_error_free(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    assert path.stat().st_size < 1_000_000, f"{path.name} is {path.stat().st_size} bytes; save it with fewer outputs"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert "torch.manual_seed" in nb.cells[1].source and "torch.__version__" in nb.cells[1].source
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} was saved with an error output: {errors[0].ename}"


# What the quick-mode run of a notebook must print (regular expressions, each searched in the
# text outputs of its code cells), beyond running without error: the facts its prose explains.
# 01: 2 normal + 10 defective test samples at 128 px; 02: the hand-checked toy, the step-by-step model against
# MVAD's own methods, the first block's routing; 04: the tiny model after 2 epochs; 05: 8 training samples,
# 3 epochs, both methods, 2 draws of the dropped views.
EXPECTED = {
    "01_multiview_data": [
        r"C1: top  camera, azimuth   270 deg, elevation  90 deg\nC2: side camera",
        r"12 test samples; one item:\n  images       \(5, 3, 128, 128\)  \(V, 3, H, W\)",
        r"masks        \(5, 1, 128, 128\)",
        r"audiojack__0064_NG_HS_C1_20230912151148\.jpg +-> key audiojack__0064_NG_HS +camera C1",
        r"consecutive groups of 5 entries that hold one sample: \d+ of 12\nviews per sample key: "
        r"Counter\(\{5: 12\}\)",
        r"11 complete test samples\nwarning: left out 1 test samples that lack one of the views",
        r"defective samples by number of views that show the defect: \{0: 0, ",
        r"corrupted     \(5, 3, 128, 128\)",
        r"same item twice identical: True\nepoch 1 differs from epoch 0: True",
    ],
    "02_mvas": [
        r"C1 window 1: mean \(0\.0, 1\.0\) \| A_c \* sqrt\(c\) against C2 windows 0-3: \[1, 0, 1, 3\] -> chosen C2 window 3",
        r"mvad\.mvas_attention_reference == mvas_from_scratch == the hand computation",
        r"the steps above reproduce model\(images\), the loss, and model\.anomaly_map",
        r"\n +0, 0 +\d+ +\d+ +\d+ +100%",  # the first block routes the same before and after training
        r"OCBE: \(64, 16, 16\) \+ \(128, 8, 8\) \+ \(256, 4, 4\) -> code \(512, 2, 2\)",
        r"mvad/seed42 +dot +0 +5\.3 +0\.6 +7\.2",  # the committed routing measurement, read in quick mode too
    ],
    "03_complexity": [  # FLOP counts do not depend on quick mode
        r"dense / MVAS at the official scale 0: 118x",
        r"every count equals the exact formula",
        r"the whole MVAD, counted: 44\.8 GMACs per sample",
    ],
    "04_idif": [
        r"epoch 2/2  loss \d+\.\d+",
        r"the steps above reproduce model\.features",
        r"weight on C3's keys: 0\.0\n",
        r"C3 absent : max \|map change\| per view \['0\.0e\+00', '0\.0e\+00', '0\.0e\+00', '0\.0e\+00', '0\.0e\+00'\]",
        r"recovery \(both correlations > 0\.95\): trained L = 4 passes, the untrained bottleneck fails",
    ],
    "06_ablations": [
        r"settings: \{'profile': 'cpu', 'image_size': 128, 'batch_size': 4, 'epochs': 15",
        r"\d+ of the plan's \d+ runs, \d+ with missing-view curves",
    ],
    "05_training": [
        r"Calibrating the random-init encoder's BatchNorm statistics on 8 training samples",
        r"epoch 3/3  loss \d+\.\d+",
        r"mvad on zipper: 8 test samples, drop_views 0, view_norm True",
        r"idif on zipper: 8 test samples, drop_views 0, view_norm True",
        r"mvad / zipper +\d+\.\d/",
        r"idif / zipper +\d+\.\d/",
        r"'history\.json', 'last\.pt', 'metrics\.json', 'metrics\.md', 'roc\.png'",
        r"views that show the defect: \[[01], [01], [01], [01], [01]\]",
        r"sample AUROC \(%\) over 2 draws of the dropped views",
        r"(\n +[0-4] +\d+\.\d \(\d+-\d+\)( +\d+\.\d ± +\d+\.\d \( *\d+\.\d- *\d+\.\d\)){2}( +(\d+\.\d|nan)){2}"
        r" +9\d\.\d){5}",  # K = 0..4: the positives left, both methods' sample AUROC, their image AUROC, the paper's
        r"sample by hand: AUROC 8 of 9 pairs = 0\.889, AP 0\.917, F1-max 0\.857 \| metrics\.py: AUROC 0\.889",
        r"pixel  by hand: AU-PRO 0\.899, ADer's F1 0\.750 \(exact F1-max 0\.857\) \| metrics\.py: AU-PRO 0\.899",
        r"mvad: highest raw score C\d \((normal|defect) view\); highest normalised score C\d",
    ],
}


# What a notebook's markdown quotes from its own (full-mode, committed) outputs: each string must occur in a
# markdown cell and in the text that a code cell printed (whitespace runs read as one space), so that the
# prose and the outputs cannot drift apart when a notebook is executed again.
QUOTED = {
    "01_multiview_data": ["by exactly one view: 10 of 30", "seen by 1 to 4 of the 5 views: 19 of 30",
                          "largest share of a view's pixels inside a defect mask: 4.9%"],
    "02_mvas": ["12 of 324 candidate windows are ever chosen", "counterparts among them: 0 of 4",
                "the MVAS blocks: 14% of the parameters, 12% of the MACs at 256 px",
                "the whole MVAD: 44.8 GMACs per 5-view sample at 256 px", "views ranked by their score: C5, C2",
                "17,803,392", "mvad/seed42 dot 0 5.3 0.6 7.2 1.4 97/980 62%",
                "mvad-cosine/seed42 cosine 0 10.7 0.6 11.9 1.4 602/980 3%"],
    "03_complexity": ["the deck's first line is 2.4x too small, its bound 17x",
                      "dense / MVAS at the official scale 0: 118x", "dense / MVAS 18x",
                      "dense / MVAS with the best a: 21x at h = w = 16, 171x at 64", "56.4 GMACs", "0.75 GMACs",
                      "the whole MVAD, counted: 44.8 GMACs per sample", "1046x", "112x", "61x", "11x", "135.3", "43.5",
                      "2.1 MFLOPs", "67.1"],
    "04_idif": ["trained 0.85, untrained 0.07", "C1: |f_E| 17.70 |f_s| 8.57", "mean Sigma = 0.158", "0.239", "1.827",
                "= 0.257", "0.057", "0.990", "0.979", "0.487", "0.852", "0.844", "0.519", "0.994", "0.003", "0.286",
                "untrained 0.27, trained 0.09", "largest change of an angle in training: 7.61 degrees",
                "untrained 0.96, trained 1.00", "untrained 10.26, trained 1.03", "0.002", "0.026", "0.032", "0.080",
                "defect views [0.325, 0.322], normal views [0.187, 0.179, 0.212]", "dropped share: 0.1978", "8.0e-03",
                "5.2e-01"],
    "05_training": ["batch 4, 15 epochs", "41.86 -> 14.25", "0.7% lower than the one before", "6.26 -> 1.69",
                    "x0.1 from epoch 13", "19.0 s per epoch", "8.5 s per epoch", "94.7/95.6/87.5", "93.4/95.4/89.3",
                    "96.4/95.2/91.2", "94.0/91.6/84.7", "26 of 27", "0.899", "0.750", "0.806",
                    "mvad: highest raw score C5 (normal view)", "highest normalised score C4 (defect view)",
                    "0.017 to 0.077", "0.062 to 0.179", "16.8 (14-19)", "75.6", "89.4", "83.7 ± 6.2", "95.2 ± 0.5",
                    "96.9 ± 1.3", "98.2 ± 1.5", "97.5 ± 1.8", "87.3 ± 2.9", "78.5 ± 5.6", "94.0 ± 1.0", "88.3", "83.6",
                    "86.3"],
    "06_ablations": ["idif - patchcore sample_auroc +32.7 (spreads 5.7 + 6.5) -> supported",
                     "idif - idif-ensemble sample_auroc +25.8 (spreads 5.7 + 2.3) -> supported",
                     "mvad - patchcore sample_auroc +3.5 (spreads 3.7 + 6.5) -> undecided",
                     "idif - patchcore sample_auroc +3.9 (spreads 1.0 + 1.7) -> supported",
                     "idif-ivc - idif-ensemble sample_auroc -4.9 (spreads 2.0 + 0.5) -> contradicted; by seed -7.2, "
                     "-2.3, -5.0",
                     "by seed -0.4, +0.6, +7.4", "by seed +1.7, +1.3, +3.6", "by seed +4.7, -0.7, +3.2",
                     "by seed +1.3, +0.1, +0.4", "by seed +1.4, +2.2, +2.8", "by seed +2.0, -1.9, +1.8",
                     "by seed -2.9, -1.7, -1.4", "by seed +0.1, -0.2, -0.1", "by seed -0.9, -1.7, -2.3",
                     "by seed +1.0, +0.6, +0.8", "by seed -4.0, +1.6, +1.0",
                     "zipper idif-ensemble last distill 1.15 ± 0.05", "zipper idif-ivc last distill 1.64 ± 0.08",
                     "zipper mvad sample AUROC 90.1, 92.4, 96.0", "zipper rd sample AUROC 88.8, 92.3, 95.6",
                     "zipper idif-ensemble sample AUROC 97.0, 96.1, 96.9",
                     "zipper patchcore sample AUROC 90.6, 91.9, 88.6",
                     "audiojack idif-ensemble sample AUROC 88.4, 88.8, 90.6",
                     "audiojack mvad sample AUROC 83.3, 88.8, 86.4",
                     "audiojack patchcore sample AUROC 86.6, 88.3, 87.7",
                     "zipper uniad sample AUROC 62.6, 70.2, 70.7", "zipper simplenet sample AUROC 58.2, 60.8, 46.2",
                     "zipper idif-ensemble 45 epochs: sample AUROC 99.8, 100.0, 98.7; last distill 0.81, 0.74, 0.75",
                     "zipper idif-ivc 45 epochs: sample AUROC 90.9, 93.9, 91.2; last distill 1.41, 1.42, 1.40",
                     "idif-ivc - idif-ensemble sample_auroc -7.5 (spreads 1.6 + 0.7) -> contradicted",
                     "-3.1 (spreads 0.4 + 0.7) -> contradicted; by seed -2.4, -3.9, -2.9",
                     "zipper idif-ivc-residual sample AUROC 97.6, 98.2, 96.2; last distill 1.18, 1.25, 1.23",
                     "idif-ivc-residual - idif-ivc sample_auroc +5.5 (spreads 1.0 + 2.0) -> supported",
                     "+2.4 (spreads 0.7 + 0.6) -> supported",
                     "zipper_consistency idif-ivc-residual sample AUROC 56.7, 61.6, 61.7",
                     "zipper_consistency idif-ivc sample AUROC 65.6, 91.9, 69.9",
                     "idif - idif-ivc sample_auroc -0.1 (spreads 0.5 + 0.4) -> undecided; by seed -0.7, -0.4, +0.9",
                     "zipper mvad 45 epochs: sample AUROC 96.4, 98.8, 100.0",
                     "zipper rd 45 epochs: sample AUROC 97.3, 97.2, 99.0",
                     "mvad - rd sample_auroc +0.6 (spreads 1.8 + 1.0) -> undecided; by seed -0.9, +1.6, +1.0",
                     "mvad-oracle - rd sample_auroc +1.3 (spreads 0.9 + 1.0) -> undecided; by seed +0.9, +2.2, +0.9",
                     "by seed +1.8, +0.7, -0.1", "last loss 6.54, 6.23, 5.70", "last loss 8.58, 7.17, 7.58",
                     "zipper_consistency patchcore sample AUROC 55.8, 45.8, 58.0",
                     "zipper_consistency idif-ensemble sample AUROC 58.4, 62.7, 59.1",
                     "zipper_consistency idif sample AUROC 87.4, 90.7, 79.6",
                     "zipper_consistency mvad sample AUROC 56.6, 60.4, 53.0",
                     "zipper idif K = 1..4: p_K 0.93, 0.81, 0.71, 0.56",
                     "mixture 91.6, 87.7, 83.0, 75.5 | measured 92.0, 87.8, 82.6, 78.0"],
}


def squeeze(text):
    """Whitespace runs (line breaks, column padding) as one space."""
    return " ".join(text.split())


@pytest.mark.parametrize("name", sorted(QUOTED))
def test_markdown_quotes_only_numbers_the_outputs_show(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    markdown = squeeze(" ".join(c.source for c in nb.cells if c.cell_type == "markdown"))
    printed = squeeze(" ".join(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "")
                               for c in nb.cells if c.cell_type == "code" for o in c.outputs))
    for quote in QUOTED[name]:
        assert squeeze(quote) in markdown, f"{name}: the markdown no longer quotes {quote!r}; update QUOTED"
        assert squeeze(quote) in printed, f"{name}: the markdown quotes {quote!r}, which no printed output shows"


# The deck beside the implementation (02: MVAD, 04: IDIF): a markdown table whose header starts "| the deck |" and whose
# last column names, in backticks, the function, class, method or config field that implements each row. Every row must
# name at least one, every name must exist, and the rows the seminar needs must stay (these names): 02's A_c transpose
# (mvas_routing), post-norm block with its MLP, optimiser and batch-scaled rate, OCBE, loss weight 5, the map's /9;
# 04's L_Distill, L_IB with its KL, the denoising student, the turntable STN, the mean-pooled CB input, view dropout.
DECK_TABLES = {
    "02_mvas": ["mvad.mvas_routing", "mvad.MVASBlock", "mvad.MVADConfig.mlp_ratio", "mvad.MVADConfig.base_lr",
                "train.build_optimizer", "mvad.OCBE", "mvad.MVADConfig.loss_weight", "mvad.MVAD.anomaly_map"],
    "04_idif": ["idif.distillation_loss", "idif.ConsistencyBottleneck.ib_loss", "idif.IDIFConfig.kl_weight",
                "data.PseudoAnomalies", "idif.rotate_and_project", "idif.masked_view_mean",
                "idif.IDIFConfig.view_dropout"],
}


def deck_table_rows(name):
    """The backticked names in the last column of each row of the notebook's deck table."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    tables = [c.source for c in nb.cells if c.cell_type == "markdown" and "\n| the deck |" in "\n" + c.source]
    assert len(tables) == 1, f"{name}: expected one deck table (a header row '| the deck |'), found {len(tables)}"
    rows = [line for line in tables[0].splitlines()
            if line.startswith("|") and not line.startswith(("| the deck", "|---"))]
    return [re.findall(r"`([\w.]+)`", row.rstrip(" |").rsplit("|", 1)[1]) for row in rows]


def exists(dotted):
    """module.attribute[.attribute ...] exists; the last part may also be a field of a config dataclass."""
    module, *attributes = dotted.split(".")
    obj = importlib.import_module(module)
    for attribute in attributes:
        fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
        if attribute in fields and attribute == attributes[-1]:
            return True
        if not hasattr(obj, attribute):
            return False
        obj = getattr(obj, attribute)
    return True


@pytest.mark.parametrize("name", sorted(DECK_TABLES))
def test_deck_tables_name_what_exists(name):
    rows = deck_table_rows(name)
    assert rows and all(rows), f"{name}: a row of the deck table names no function or config field"
    named = {n for row in rows for n in row}
    missing = [n for n in DECK_TABLES[name] if n not in named]
    assert not missing, f"{name}: the deck table no longer has the rows that name {missing}"
    unknown = sorted(n for n in named if not exists(n))
    assert not unknown, f"{name}: the deck table names {unknown}, which the code does not have"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_quick_mode(name, monkeypatch, tmp_path):
    monkeypatch.setenv("NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks write only into tempfile folders: here, pytest's
    # the kernel "python3" of this interpreter's environment, before any user-level kernel of that name
    monkeypatch.setenv("JUPYTER_PATH", str(Path(sys.prefix) / "share" / "jupyter"))
    if "OMP_NUM_THREADS" not in os.environ:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, naming the cell, when a cell fails
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "quick mode True" in outputs  # the setup cell saw the environment variable
    for pattern in EXPECTED.get(name, []):
        assert re.search(pattern, outputs), f"{name}: no output matches {pattern!r}"
