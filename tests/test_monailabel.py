"""The MONAI Label app (scripts/monailabel_app) served for real: HTTP requests against the bundles' own inference.

One server on a free localhost port serves ``resdce``, ``dcediff``, ``ressrdiff``, ``d3m`` and ``iterunet`` (tiny
phantom cases, small networks with perturbed random weights so outputs vary, 2 sampling steps; iterunet on the
prostate phantom's 20-frame DCE series, 3 frames picked by offsets after arrival); each synthesis it returns must
have the geometry of the bundle's output and equal what ``monai.bundle run evaluating`` writes for the same case,
seed and weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import bundle_here, free_port

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("monailabel") is None,
    reason="monailabel is not installed (pip install -r scripts/monailabel_app/requirements.txt)",
)

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "scripts" / "monailabel_app"
STEPS = "2"
MODELS = ("resdce", "dcediff", "ressrdiff", "d3m", "iterunet")
DIFFUSION = ("resdce", "dcediff", "ressrdiff", "d3m")  # 2 sampling steps each
# dcediff's DDPM runs all 1000 steps, its DDIM takes 2; iterunet on a prostate case (bundles/iterunet/docs/README.md:
# frames picked by offsets after arrival, the organ mask as curve region, the phantom's lesion mask read too)
EXTRA = {
    "dcediff": {"sampler": "ddim"},
    "iterunet": {
        "frame_offsets_s": "[60,120,180]",
        "mask_keys": '["organ_mask","lesion_mask"]',
        "progress": "false",
    },
}
PHASES = {"resdce": ["dce_onset", "dce_early", "dce_late"], "dcediff": ["dce_early", "dce_late"]}


def random_checkpoint(bundle: str, path: Path, seed: int = 0) -> Path:
    """A small network of ``bundle`` with every weight perturbed (the zero-initialised output layers
    would make every synthesis constant), saved as the bundle's trainer saves ``model.pt`` (with the
    settings record the task checks)."""
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(ROOT / "bundles" / bundle / "configs" / f) for f in ("train.json", "inference.json")])
    p.update({"network_size": "small", "ckpt_path": str(path)})
    torch.manual_seed(seed)
    net = p.get_parsed_content("network_def")
    with torch.no_grad():
        for w in net.parameters():
            w.add_(0.05 * torch.randn_like(w))
    record = p.get_parsed_content("checkpoint_record").state_dict() if "checkpoint_record" in p else None
    torch.save({"model": net.state_dict(), **({"config": record} if record else {})}, path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``serve.py start_server`` (a copy of the app, so nothing is written in the repository) with
    resdce, dcediff, ressrdiff and d3m; yields ``{"url", "case", "log", "ckpt": {bundle: path}}``."""
    from common.phantoms import write_phantoms

    tmp = tmp_path_factory.mktemp("monailabel")
    write_phantoms(
        tmp / "ph", kinds=("prostate", "brain"), n_prostate=1, n_brain=1, dicom=False, small=True, progress=False
    )
    studies = tmp / "ph" / "prostate" / "prepared"
    ckpt = {b: random_checkpoint(b, tmp / f"{b}.pt", seed=i) for i, b in enumerate(MODELS)}
    app = tmp / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    port = free_port()
    conf = ["--conf", "models", ",".join(MODELS)]
    for b, path in ckpt.items():
        conf += ["--conf", f"{b}.ckpt_path", str(path)]
        conf += ["--conf", f"{b}.num_inference_steps", STEPS] if b in DIFFUSION else []
        conf += [x for k, v in EXTRA.get(b, {}).items() for x in ("--conf", f"{b}.{k}", v)]
    log = tmp / "server.log"
    server_tmp = tmp / "server_tmp"  # the server's temporary folder (an upload must leave nothing there)
    server_tmp.mkdir()
    # the brain case inside the datastore (requests may name only images of the --studies folder)
    brain = studies / next(p for p in (tmp / "ph" / "brain").iterdir() if p.is_dir()).name
    shutil.copytree(tmp / "ph" / "brain" / brain.name, brain)
    cmd = [sys.executable, str(app / "serve.py"), "start_server", "--app", str(app), "--studies", str(studies)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *conf]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TMPDIR=str(server_tmp))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/info/", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"MONAI Label server did not start (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield {
            "url": url,
            "case": studies / "phantom-000",
            "brain": brain,
            "outside": tmp / "ph" / "brain" / brain.name,  # the same case outside the datastore
            "log": log,
            "ckpt": ckpt,
            "tmp": server_tmp,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def infer(
    served: dict, model: str, image: str, output: str = "image", params: dict | str | None = None
) -> tuple[int, bytes] | tuple[int, bytes, str]:
    """POST /infer/<model>?image=...&output=...; ``params`` go in the form field MONAI Label reads them from
    (a string as it is). ``(status, body)``; with ``output="all"`` ``(status, body, content type)`` (multipart)."""
    import json

    query = urllib.parse.urlencode({"image": image, "output": output})
    text = params if isinstance(params, str) else json.dumps(params or {})
    form = urllib.parse.urlencode({"params": text}).encode()
    req = urllib.request.Request(
        f"{served['url']}/infer/{model}?{query}",
        data=form,
        method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    if output == "all":
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read(), r.headers["Content-Type"]
        except urllib.error.HTTPError as e:
            return e.code, e.read(), ""
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def direct(bundle: str, out: Path, ckpt: Path, *source: str, steps: str = STEPS) -> None:
    """The bundle's own inference on the same study (``monai.bundle run evaluating``)."""
    config = str([str(ROOT / "bundles" / bundle / "configs" / f) for f in ("train.json", "inference.json")])
    extra = [x for k, v in EXTRA.get(bundle, {}).items() for x in (f"--{k}", v)]
    extra += ["--num_inference_steps", steps] if bundle in DIFFUSION else []
    args = ["--output_dir", str(out), "--ckpt_path", str(ckpt), *extra, *source]
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # as the server (OMP_NUM_THREADS=1): small per-slice ops crawl with 2 threads on busy cores
    try:
        bundle_here("run", "evaluating", "--config_file", config, *args)
    finally:
        torch.set_num_threads(threads)


def load_result(body: bytes, path: Path) -> nib.Nifti1Image:
    path.write_bytes(body)
    return nib.load(path)


def test_info_lists_the_synthesis_tasks(served):
    import json

    with urllib.request.urlopen(f"{served['url']}/info/", timeout=10) as r:
        info = json.loads(r.read())
    assert set(info["models"]) == set(MODELS)
    assert info["models"]["resdce"]["type"] == "others"  # an image result, not a segmentation label
    for model, phases in {**PHASES, "ressrdiff": ["sr"], "d3m": ["t1c"]}.items():
        assert info["models"][model]["config"]["channels"] == phases
    assert "after start_phase 1" in info["models"]["iterunet"]["config"]["channels"]  # per case: its times
    assert info["models"]["d3m"]["config"]["results"] == ["image", "et_mask"]


@pytest.mark.parametrize("model", list(PHASES))
def test_prostate_synthesis_over_http_equals_the_bundle(served, tmp_path, model):
    phases = PHASES[model]
    status, body = infer(served, model, str(served["case"] / "t2w.nii.gz"))
    assert status == 200, body[-2000:]
    res = load_result(body, tmp_path / f"{model}.nii.gz")
    pre = nib.load(served["case"] / "dce_pre.nii.gz")
    assert res.shape == (*pre.shape, len(phases))  # one channel per phase along the 4th axis
    np.testing.assert_allclose(res.affine, pre.affine, atol=1e-4)
    direct(model, tmp_path / "direct", served["ckpt"][model], "--case_dir", str(served["case"]))
    got = res.get_fdata(dtype=np.float32)
    for c, name in enumerate(phases):
        ref = nib.load(tmp_path / "direct" / "phantom-000" / f"{name}.nii.gz")
        want = ref.get_fdata(dtype=np.float32)
        assert want.std() > 0, f"{name}: constant synthesis, the comparison would prove nothing"
        np.testing.assert_allclose(got[..., c], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
        np.testing.assert_allclose(res.affine, ref.affine, atol=1e-4)


def test_ressrdiff_over_http_equals_the_bundle(served, tmp_path):
    # a series path relative to the studies folder is accepted as well
    status, body = infer(served, "ressrdiff", "phantom-000/t2w.nii.gz")
    assert status == 200, body[-2000:]
    res = load_result(body, tmp_path / "sr.nii.gz")
    direct(
        "ressrdiff",
        tmp_path / "direct",
        served["ckpt"]["ressrdiff"],
        "--input_file",
        str(served["case"] / "t2w.nii.gz"),
    )
    ref = nib.load(tmp_path / "direct" / "phantom-000" / "sr.nii.gz")
    assert res.shape == ref.shape
    np.testing.assert_allclose(res.affine, ref.affine, atol=1e-4)
    want = ref.get_fdata(dtype=np.float32)
    assert want.std() > 0
    np.testing.assert_allclose(res.get_fdata(dtype=np.float32), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def multipart(body: bytes, content_type: str) -> tuple[dict, bytes]:
    """``(params, image bytes)`` of MONAI Label's ``output=all`` answer (fields ``params``, ``image``)."""
    import json

    from requests_toolbelt.multipart.decoder import MultipartDecoder

    parts = {}
    for part in MultipartDecoder(body, content_type).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        parts[disposition.split('name="')[1].split('"')[0]] = part.content
    return json.loads(parts["params"]), parts["image"]


def test_d3m_over_http_equals_the_bundle(served, tmp_path):
    case = served["brain"]
    t1n = case / f"{case.name}-t1n.nii.gz"
    status, body = infer(served, "d3m", str(t1n))
    assert status == 200, body[-2000:]
    res = load_result(body, tmp_path / "t1c.nii.gz")
    ref_in = nib.load(t1n)
    assert res.shape == ref_in.shape  # the image result: T1c
    np.testing.assert_allclose(res.affine, ref_in.affine, atol=1e-4)
    direct("d3m", tmp_path / "direct", served["ckpt"]["d3m"], "--case_dir", str(case))
    ref = nib.load(tmp_path / "direct" / case.name / "t1c.nii.gz")
    want = ref.get_fdata(dtype=np.float32)
    assert want.std() > 0
    np.testing.assert_allclose(res.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(res.get_fdata(dtype=np.float32), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    # the enhancing-tumour mask: params {"result_key": "et_mask"} -> the uint8 label volume, its size in the params
    status, body, ctype = infer(served, "d3m", str(t1n), output="all", params={"result_key": "et_mask"})
    assert status == 200, body[-2000:]
    params, image = multipart(body, ctype)
    mask = load_result(image, tmp_path / "et_mask.nii.gz")
    ref_mask = nib.load(tmp_path / "direct" / case.name / "et_mask.nii.gz")
    assert mask.get_data_dtype() == np.uint8 and mask.shape == ref_in.shape
    np.testing.assert_allclose(mask.affine, ref_in.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), np.asanyarray(ref_mask.dataobj))
    voxel_ml = abs(np.linalg.det(ref_in.affine[:3, :3])) / 1000
    n = int(np.asanyarray(ref_mask.dataobj).sum())
    assert params["result_key"] == "et_mask" and params["channels"] == ["et_mask"] and params["et_mask_voxels"] == n
    assert params["et_mask_ml"] == pytest.approx(n * voxel_ml, abs=1e-4)
    status, body = infer(served, "d3m", str(t1n), params={"result_key": "deformation"})
    assert status == 400 and "result_key 'deformation' is not one of ['image', 'et_mask']" in body.decode()


def test_iterunet_over_http_equals_the_bundle(served, tmp_path):
    """A predicted time series: one channel per time point after the start phase, named from the case's times."""
    from common.handlers.iterunet import phase_names

    dce = served["case"] / "dce.nii.gz"
    status, body, ctype = infer(served, "iterunet", str(dce), output="all")
    assert status == 200, body[-2000:]
    params, image = multipart(body, ctype)
    res = load_result(image, tmp_path / "iterunet.nii.gz")
    direct("iterunet", tmp_path / "direct", served["ckpt"]["iterunet"], "--case_dir", str(served["case"]))
    kin = json.loads((tmp_path / "direct" / "phantom-000" / "kinetics.json").read_text())
    times = kin["times_s"]  # pre, the start phase and the predicted points, seconds after arrival
    assert len(times) == 4 and params["start_phase"] == 1
    assert params["channels"] == phase_names(times, 1) == kin["predicted_phases"]
    np.testing.assert_allclose(params["times_s"], times[2:], atol=1e-4)
    src = nib.load(dce)
    assert res.shape == (*src.shape[:3], 2) and params["geometry"] == str(dce)
    np.testing.assert_allclose(res.affine, src.affine, atol=1e-4)
    ref = nib.load(tmp_path / "direct" / "phantom-000" / "dce_synth.nii.gz")
    want = ref.get_fdata(dtype=np.float32)
    assert want.shape == res.shape and want.std() > 0
    np.testing.assert_allclose(res.get_fdata(dtype=np.float32), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    # in input intensity units: the predicted frames lie in the range of the acquired series
    lo, hi = float(src.get_fdata().min()), float(src.get_fdata().max())
    assert -0.5 * (hi - lo) < float(want.mean()) < 1.5 * hi


def test_an_incomplete_case_is_named(served, tmp_path):
    import json

    case = served["case"].parent / "lonely"  # inside the datastore
    case.mkdir()
    shutil.copy(served["case"] / "t2w.nii.gz", case / "t2w.nii.gz")
    status, body = infer(served, "resdce", str(case / "t2w.nii.gz"))
    assert status == 400, body[-2000:]
    detail = json.loads(body)["detail"]
    assert f"request image {case / 't2w.nii.gz'} is not part of a complete study" in detail
    assert "adc.nii.gz" in detail and "dce_pre.nii.gz" in detail  # the missing series, by name
    # a file beside a complete case that is not one of its series
    stray = served["case"].parent / "stray.nii.gz"
    shutil.copy(served["case"] / "t2w.nii.gz", stray)
    status, body = infer(served, "resdce", str(stray))
    assert status == 400 and "not part of a complete study" in json.loads(body)["detail"]
    stray.unlink()
    shutil.rmtree(case)


def test_missing_weights_are_named(tmp_path, monkeypatch):
    """The task itself (MONAI Label's BasicInferTask, in this process): no weights -> the file, and how to set it."""
    monkeypatch.syspath_prepend(str(APP))
    from lib.infers import BundleSynthesisTask, CheckpointError

    task = BundleSynthesisTask("resdce", {"ckpt_path": str(tmp_path / "none.pt"), "network_size": "small"})
    assert task.output_names == PHASES["resdce"] and task.geometry_key == "dce_pre"
    with pytest.raises(CheckpointError, match=r"no trained weights at .*none\.pt.*--conf resdce\.ckpt_path"):
        task.run_inferer({}, device="cpu")


def detail_of(status_body: tuple) -> tuple[int, str]:
    """``(status, detail)`` of a refused request (FastAPI's ``{"detail": ...}``)."""
    status, body = status_body[:2]
    return status, json.loads(body)["detail"]


def new_files(served: dict, before: set) -> set:
    """Files that appeared in the server's temporary folder since ``before`` (result files MONAI Label removes
    after an answer excluded: only names that are not ``<model>_<result>_...`` results)."""
    return {p.name for p in served["tmp"].rglob("*") if p.is_file()} - before


def no_traceback_since(served: dict, start: int) -> str:
    text = served["log"].read_text()[start:]
    assert "Traceback" not in text, text[-3000:]
    return text


def test_requests_may_name_only_images_of_the_datastore(served, tmp_path):
    """A file the server can read outside --studies is refused (403) and nothing is synthesised."""
    start = len(served["log"].read_text())
    before = {p.name for p in served["tmp"].rglob("*") if p.is_file()}
    outside = served["outside"] / f"{served['outside'].name}-t1n.nii.gz"  # a complete brain case, outside
    digest = outside.read_bytes()
    status, detail = detail_of(infer(served, "d3m", str(outside)))
    assert status == 403, detail
    studies = served["case"].parent.resolve()
    assert detail == (
        f"request image {outside}: outside the app's datastore {studies} "
        "(requests may name only images of the --studies folder)"
    )
    # relative paths that climb out, and a symbolic link inside the studies folder pointing outside
    rel = os.path.relpath(outside, studies)
    assert rel.startswith("..")
    assert detail_of(infer(served, "d3m", rel))[0] == 403
    link = studies / "link-t1n.nii.gz"
    link.symlink_to(outside)
    try:
        status, detail = detail_of(infer(served, "d3m", str(link)))
    finally:
        link.unlink()
    assert status == 403 and "outside the app's datastore" in detail
    status, detail = detail_of(infer(served, "resdce", "/etc/hostname"))
    assert status == 403 and detail.startswith("request image /etc/hostname: outside the app's datastore")
    # inside, but no such file
    status, detail = detail_of(infer(served, "resdce", "phantom-000/nope.nii.gz"))
    assert (
        status == 404
        and detail == f"request image phantom-000/nope.nii.gz: no such file in the studies folder {studies}"
    )
    assert outside.read_bytes() == digest
    assert new_files(served, before) == set()  # nothing synthesised
    no_traceback_since(served, start)


def test_request_params_are_honoured_or_refused(served, tmp_path):
    """num_inference_steps / num_samples of a request are the bundle's ids for that request (the answer equals the
    bundle run with them); unknown keys, non-objects, bad values, an unknown model and no image: 4xx, one line."""
    start = len(served["log"].read_text())
    t2w = str(served["case"] / "t2w.nii.gz")
    status, body, ctype = infer(served, "resdce", t2w, output="all", params={"num_inference_steps": 1, "device": "cpu"})
    assert status == 200, body[-2000:]
    params, image = multipart(body, ctype)
    assert params["num_inference_steps"] == 1 and params["num_samples"] == 1
    res = load_result(image, tmp_path / "one_step.nii.gz").get_fdata(dtype=np.float32)
    direct("resdce", tmp_path / "direct", served["ckpt"]["resdce"], "--case_dir", str(served["case"]), steps="1")
    for c, name in enumerate(PHASES["resdce"]):
        want = nib.load(tmp_path / "direct" / "phantom-000" / f"{name}.nii.gz").get_fdata(dtype=np.float32)
        np.testing.assert_allclose(res[..., c], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    status, body, ctype = infer(served, "resdce", t2w, output="all")  # the served default: 2 steps
    assert status == 200 and multipart(body, ctype)[0]["num_inference_steps"] == int(STEPS)
    default = load_result(multipart(body, ctype)[1], tmp_path / "default.nii.gz").get_fdata(dtype=np.float32)
    assert np.abs(default - res).max() > 1e-3  # the step count changed the answer
    status, body = infer(served, "resdce", t2w, output="json", params={"num_samples": 2})
    assert status == 200 and json.loads(body)["num_samples"] == 2
    refused = {
        '{"num_inference_steps": 1, "seed": 3, "foo": 1}': (
            400,
            "params: 'seed', 'foo' not accepted by resdce (accepted: device, num_inference_steps, num_samples)",
        ),
        "not json": (400, "params: not JSON"),
        "[1, 2]": (400, "params: must be a JSON object, got list [1, 2]"),
        '{"num_inference_steps": 0}': (400, "params: num_inference_steps must be a positive integer, got 0"),
        '{"num_samples": "2"}': (400, "params: num_samples must be a positive integer, got '2'"),
        '{"device": "tpu"}': (400, "params: device must be 'cpu', 'cuda' or 'cuda:<n>', got 'tpu'"),
    }
    for text, (code, message) in refused.items():
        status, detail = detail_of(infer(served, "resdce", t2w, params=text))
        assert status == code and detail.startswith(message), (text, status, detail)
    status, detail = detail_of(infer(served, "iterunet", str(served["case"] / "dce.nii.gz"), params={"num_samples": 2}))
    assert status == 400 and detail == "params: 'num_samples' not accepted by iterunet (accepted: device)"
    status, detail = detail_of(infer(served, "nosuch", t2w))
    assert status == 404 and detail == f"unknown model 'nosuch': this app serves {', '.join(sorted(MODELS))}"
    status, detail = detail_of(infer(served, "resdce", ""))
    assert status == 400 and detail.startswith("no image: name a series file of the studies folder")
    log = no_traceback_since(served, start)
    assert " 500 " not in log


def test_uploads_are_refused_and_leave_no_file(served):
    """MONAI Label writes an upload to a temporary file it removes only after a successful answer; this app
    refuses uploads before that (400) and nothing is left in the server's temporary folder."""
    import uuid

    start = len(served["log"].read_text())
    before = {p.name for p in served["tmp"].rglob("*") if p.is_file()}
    data = (served["case"] / "t2w.nii.gz").read_bytes()
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{{}}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t2w.nii.gz"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        f"{served['url']}/infer/resdce?output=image",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, answer = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, answer = e.code, e.read()
    assert status == 400, answer[-2000:]
    assert json.loads(answer)["detail"].startswith("uploads are not supported by this app")
    time.sleep(0.5)
    assert new_files(served, before) == set()
    no_traceback_since(served, start)


def test_sigterm_stops_the_server_and_its_workers(tmp_path):
    """``serve.py ... --workers 2``: the workers start (the pydicom alias applies in them too) and SIGTERM to
    serve.py ends it and every worker, and the port stops answering."""
    import psutil

    studies = tmp_path / "studies"
    studies.mkdir()
    app = tmp_path / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    port = free_port()
    cmd = [sys.executable, str(app / "serve.py"), "start_server", "--app", str(app), "--studies", str(studies)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--conf", "models", "ressrdiff", "--workers", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GADOFREE_SHUTDOWN_GRACE_S="5")
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/info/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        assert len(family) >= 3  # serve.py and its two uvicorn workers
        proc.send_signal(15)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in family):
            assert time.monotonic() < deadline, f"still running after SIGTERM: {family}"
            time.sleep(0.2)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url, timeout=3)
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
