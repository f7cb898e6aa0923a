"""The pix2pix bundle (the papers' Pix2Pix baseline) for its three tasks: the networks' shapes, one GAN
step, training and inference through the command line on the prostate, brain and super-resolution
phantoms (outputs on the input's grid), and the scripts that read its per-task contract (compare.py,
synthesize.py DICOM out, the MONAI Label task). Budget: about a minute on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import helpers as h
import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "pix2pix" / "configs"
TASKS = {  # task -> (input channels, output channels)
    "prostate_dce": (3, 3),
    "brain_t1c": (3, 1),
    "sr": (1, 1),
}
TINY = [*h.SMALL, "--batch_size", "2", "--patch_size", "[32,32]", "--val_interval", "0", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def prostate(tmp_path_factory) -> Path:
    """3 tiny prostate subjects: one to train on, two held out."""
    return h.tiny_prostate_one_train(tmp_path_factory.mktemp("p2p_prostate"))


@pytest.fixture(scope="module")
def prostate_model(prostate, tmp_path_factory) -> Path:
    """2 iterations with the card's command line (a subprocess) on the prostate task (the default)."""
    models = tmp_path_factory.mktemp("p2p_prostate_models")
    h.train(CONFIGS, models, "--dataset_dir", str(prostate), *TINY)
    return models / "model.pt"


def test_configs_parse_with_the_papers_settings():
    meta = h.check_bundle_configs(CONFIGS, train=["train#gan_step", "train#d_optimizer", "discriminator_def"])
    assert meta["version"] in meta["changelog"]
    p = h.parser(CONFIGS, "train.json", network_size="small", device="cpu")
    opt, d_opt = p.get_parsed_content("train#optimizer"), p.get_parsed_content("train#d_optimizer")
    for o in (opt, d_opt):
        assert o.defaults["lr"] == 2e-4 and tuple(o.defaults["betas"]) == (0.5, 0.999)
    step = p.get_parsed_content("train#gan_step")
    assert step.l1_weight == 100.0 and step.adversarial.criterion == "bce"
    # the reproduction harness's overrides are ids of train.json, with the other bundles' meanings
    for key in ("dataset_dir", "output_dir", "num_iterations", "batch_size", "patch_size", "seed", "lr"):
        assert key in p
    for key in ("network_size", "num_workers", "val_interval", "epoch_length"):
        assert key in p
    from common.errors import user_message

    with pytest.raises(Exception) as e:
        h.parser(CONFIGS, "train.json", task="knee").get_parsed_content("input_keys")
    assert user_message(e.value) == "--task 'knee': expected one of prostate_dce, brain_t1c, sr"


@pytest.mark.parametrize("task", list(TASKS))
def test_generator_and_discriminator_shapes(task):
    from common.bundle import read_contract
    from common.networks.pix2pix import spatial_divisor

    cin, cout = TASKS[task]
    p = h.parser(CONFIGS, "train.json", task=task, network_size="small", device="cpu")
    contract = read_contract("pix2pix", task)
    assert len(contract.input_keys) == cin and len([o for o in contract.outputs if not o.label_map]) == cout
    g, d = p.get_parsed_content("network_def").eval(), p.get_parsed_content("discriminator_def").eval()
    x = torch.rand(2, cin, 64, 40)
    with torch.no_grad():
        y = g(x)
        logits = d(torch.cat([x, y], 1))[-1]
    # 70x70 PatchGAN: three stride-2 4x4 convolutions (padding 1) and two stride-1 ones: n -> n/8 - 2
    assert y.shape == (2, cout, 64, 40) and logits.shape == (2, 1, 64 // 8 - 2, 40 // 8 - 2)
    assert p.get_parsed_content("spatial_divisor") == spatial_divisor("small") == 8 and spatial_divisor("paper") == 128
    paper = h.parser(CONFIGS, "train.json", task=task, network_size="paper", device="cpu")
    gp = paper.get_parsed_content("network_def")
    assert gp.channels == (64, 128, 256, 512, 512, 512, 512, 512) and (gp.in_channels, gp.out_channels) == (cin, cout)
    assert paper.get_parsed_content("discriminator_def").num_channels == 64


def _trainer(network, discriminator, batch, nan=False):
    from monai.engines import SupervisedTrainer

    from common.engines.gan import Pix2PixIteration
    from common.handlers import StopOnNonFiniteLoss

    opt = torch.optim.Adam(network.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch],
        network=network,
        optimizer=opt,
        loss_function=torch.nn.L1Loss(),
        iteration_update=Pix2PixIteration(discriminator, d_opt, l1_weight=100.0),
        train_handlers=[StopOnNonFiniteLoss()],
    )
    return trainer


def test_one_gan_step_changes_both_networks_and_the_loss_is_the_papers():
    from common.networks.pix2pix import pix2pix_discriminator, pix2pix_generator

    torch.manual_seed(0)
    g, d = pix2pix_generator("small", 3, 3), pix2pix_discriminator("small", 6)
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "label": torch.rand(2, 3, 32, 32) * 2 - 1}
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (g, d)]
    trainer = _trainer(g, d, batch)
    trainer.run()
    out = trainer.state.output[0]  # decollated: the first slice's entries, the losses shared
    loss, d_loss, g_adv, g_l1 = (float(out[k]) for k in ("loss", "d_loss", "g_adv", "g_l1"))
    assert all(np.isfinite([loss, d_loss, g_adv, g_l1]))
    assert loss == pytest.approx(g_adv + 100.0 * g_l1, rel=1e-6)
    pred = torch.stack([o["pred"] for o in trainer.state.output])  # G's output before its update
    assert g_l1 == pytest.approx(float((pred - batch["label"]).abs().mean()), rel=1e-5)
    # an untrained discriminator is near chance: the BCE of a logit near 0 is ln 2
    assert abs(d_loss - np.log(2)) < 0.3 and abs(g_adv - np.log(2)) < 0.5
    for m, b in zip((g, d), before):
        changed = [k for k, v in m.state_dict().items() if v.is_floating_point() and not torch.equal(v, b[k])]
        assert any(k.endswith("weight") for k in changed), type(m).__name__


def test_a_non_finite_loss_stops_before_any_weight_changes():
    from common.handlers import NonFiniteLossError
    from common.networks.pix2pix import pix2pix_discriminator, pix2pix_generator

    g, d = pix2pix_generator("small", 1, 1), pix2pix_discriminator("small", 2)
    image = torch.rand(2, 1, 32, 32)
    image[0, 0, 3, 3] = float("nan")
    params = [[p.clone() for p in m.parameters()] for m in (g, d)]
    with pytest.raises(NonFiniteLossError, match="the loss is nan at iteration 1"):
        _trainer(g, d, {"image": image, "label": torch.rand(2, 1, 32, 32)}).run()
    for m, ps in zip((g, d), params):
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ps))


def test_prostate_trains_infers_and_scores_like_resdce(prostate, prostate_model, tmp_path):
    out = tmp_path / "eval"
    h.evaluate(CONFIGS, prostate_model, out, "--dataset_dir", str(prostate), "--device", "cpu", runner=h.bundle_here)
    state = h.final_checkpoint(prostate_model.parent, 2)
    assert {"model", "discriminator", "optimizer", "d_optimizer", "trainer", "config"} <= set(state)
    assert state["config"]["task"] == "prostate_dce" and state["config"]["network_size"] == "small"
    rows = h.check_dce_evaluation(
        out, prostate, "dce_pre.nii.gz", ["dce_onset", "dce_early", "dce_late"], {"pix2pix", "copy_pre", "paired_input"}
    )
    assert {r["phase"] for r in rows} == {"dce_onset", "dce_early", "dce_late"}


def test_brain_and_sr_tasks_train_and_infer_on_the_input_grid(tmp_path):
    brain = h.tiny_phantoms(tmp_path / "b", "brain", 4)
    shape = dict(prostate_t2w_shape=(48, 48, 8), prostate_t2w_spacing=(4.0, 4.6, 3.6))
    volumes = h.tiny_phantoms(tmp_path / "s", "prostate", 3, "nifti", **shape)
    for task, data, methods in (
        ("brain_t1c", brain, {"pix2pix", "copy_t1n"}),
        ("sr", volumes, {"pix2pix", "bicubic", "nearest"}),
    ):
        models, out = tmp_path / task / "models", tmp_path / task / "eval"
        args = ("--task", task, "--dataset_dir", str(data))
        h.train(CONFIGS, models, *args, *TINY, runner=h.bundle_here)
        h.evaluate(CONFIGS, models / "model.pt", out, *args, "--device", "cpu", runner=h.bundle_here)
        rows = h.read_csv(out / "metrics.csv")
        assert {r["method"] for r in rows} == methods
        cid = rows[0]["case"]
        if task == "brain_t1c":
            ref = data / cid / f"{cid}-t1n.nii.gz"
            h.assert_same_grid(out / cid / "t1c.nii.gz", ref)
            assert {r["region"] for r in rows} == {"whole", "brain", "tumour"}
        else:
            h.assert_same_grid(out / cid / "sr.nii.gz", data / cid / "t2w.nii.gz")
        assert (out / cid / "panel.png").stat().st_size > 0
    # exported in the task its weights record (the exported configs' default)
    from scripts.export_bundle import export

    exported = export("pix2pix", tmp_path / "dist", weights=tmp_path / "brain_t1c" / "models" / "model.pt")
    for name in ("train.json", "inference.json"):
        assert json.loads((exported / "configs" / name).read_text())["task"] == "brain_t1c"
    # weights of one task refused by another before any work, naming the setting to pass
    from common.bundle import check_checkpoint

    record = h.parser(CONFIGS, "train.json", "inference.json", device="cpu").get_parsed_content("checkpoint_record")
    with pytest.raises(
        ValueError, match="task: the checkpoint has 'brain_t1c', this run 'prostate_dce'.*--task brain_t1c"
    ):
        check_checkpoint(tmp_path / "brain_t1c" / "models" / "model.pt", record)


def test_compare_puts_pix2pix_in_the_prostate_table(prostate, prostate_model, tmp_path):
    from scripts import compare as C

    budget = tmp_path / "budget.json"
    budget.write_text(
        json.dumps(
            {
                "num_iterations": 1,
                "batch_size": 2,
                "patch_size": [32, 32],
                "seed": 0,
                "network_size": "small",
                "num_workers": 0,
                "val_interval": 0,
                "methods": {"resdce": {"num_inference_steps": 2}},
            }
        )
    )
    res = C.main(
        dataset_dir=str(prostate),
        methods="resdce,pix2pix",
        out=str(tmp_path / "cmp"),
        budget=str(budget),
        ckpt=f"pix2pix={prostate_model}",
        device="cpu",
    )
    assert res["methods"]["pix2pix"]["task"] == "prostate_dce"  # chosen from resdce's outputs
    assert res["methods"]["pix2pix"]["sampler"] == "Generator" and res["methods"]["pix2pix"]["steps"] == 1
    methods = {r["method"] for r in res["table"]}
    assert {"resdce", "pix2pix", "copy_pre", "paired_input"} <= methods
    assert {r["phase"] for r in res["table"]} == {"dce_onset", "dce_early", "dce_late"}
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "task prostate_dce" in md and "baseline copy_pre: identical scores from resdce and pix2pix" in md
    assert len(res["panels"]) == 2
    # the task follows the other methods' outputs; a task no other method shares is refused
    from common.bundle import read_contract

    contracts = {m: read_contract(m) for m in ("d3m", "ressrdiff", "pix2pix")}
    assert (
        C.choose_task("pix2pix", {"d3m": contracts["d3m"], "pix2pix": contracts["pix2pix"]}, None).task == "brain_t1c"
    )
    assert C.choose_task("pix2pix", {"ressrdiff": contracts["ressrdiff"]}, None).task == "sr"
    with pytest.raises(C.CompareError, match="--task sr3: not a task of pix2pix"):
        C.choose_task("pix2pix", contracts, "sr3")
    with pytest.raises(C.CompareError, match="no task of prostate_dce, brain_t1c, sr writes the outputs of"):
        C.choose_task("pix2pix", {"iterunet": read_contract("iterunet")}, None)


def test_dicom_out_and_monai_label_through_the_contract(prostate, prostate_model, tmp_path):
    from common.bundle import read_contract
    from common.phantoms.dicom import write_prostate_study
    from common.phantoms.prostate import make_prostate_phantom
    from scripts.synthesize import synthesize

    grid = {"grid_shape": (48, 48, 6), "grid_spacing": (3.2, 3.2, 3.6), "t2w_shape": (96, 96, 6)}
    grid.update(t2w_spacing=(1.6, 1.6, 3.6), prepared_slices=4, n_dce=12, dce_duration_s=160.0)
    study = Path(write_prostate_study(make_prostate_phantom(0, **grid), tmp_path / "src", "P000"))
    summary = synthesize(
        study, "pix2pix", tmp_path / "synth", ingest={"crop_size": "40,40,4"}, ckpt_path=str(prostate_model),
        device="cpu",
    )  # fmt: skip
    assert [s["key"] for s in summary["series"]] == ["dce_onset", "dce_early", "dce_late"]
    assert summary["method"] == "Pix2Pix" and all(s["n_files"] == 4 for s in summary["series"])
    assert summary["overrides"]["task"] == "prostate_dce"
    with pytest.raises(ValueError, match="reads no study.*super-resolves one volume"):
        synthesize(study, "pix2pix", tmp_path / "sr", ckpt_path=str(prostate_model), task="sr")
    # the contract of each task, as the scripts read it
    assert read_contract("pix2pix", overrides={"task": "brain_t1c"}).ingest == "brain"
    assert read_contract("pix2pix").overrides == {"task": "prostate_dce"}

    BundleSynthesisTask = h.monailabel_task_class()
    task = BundleSynthesisTask("pix2pix", {"ckpt_path": str(prostate_model), "device": "cpu"})
    case = prostate / h.held_out(prostate)[0]["id"]
    path, params = task({"image": str(case / "adc.nii.gz"), "device": "cpu"})
    img, ref = nib.load(path), nib.load(case / "dce_pre.nii.gz")
    assert params["channels"] == ["dce_onset", "dce_early", "dce_late"] and task.label_outputs == []
    assert img.shape == (*ref.shape[:3], 3) and np.array_equal(img.affine, ref.affine)
    assert task.request_params() == ["device"]  # no steps or samples to set


def test_benchmark_section_measures_the_bundles_networks():
    from scripts.benchmark import discover
    from scripts.benchmarks import pix2pix as bench

    assert discover()["pix2pix"] is bench.rows  # found by scripts/benchmark.py, no registration needed
    p = h.parser(CONFIGS, "train.json", network_size="small", device="cpu")
    g_n, d_n = (
        sum(t.numel() for t in p.get_parsed_content(i).parameters()) for i in ("network_def", "discriminator_def")
    )
    res = bench.measure_inference("small", "cpu", shape=(24, 24, 2))
    assert round(res["params_m"] * 1e6) == g_n and res["vol_s"] > 0
    train = bench.measure_training("small", "cpu", batch=2, iters=1, shape=(32, 32))
    assert round(train["params_m"] * 1e6) == g_n + d_n and train["ips"] > 0


@pytest.mark.parametrize("task", list(TASKS))
def test_each_tasks_contract_agrees_with_the_configs(task):
    from common.bundle import read_contract

    c = read_contract("pix2pix", task)
    p = h.parser(CONFIGS, "train.json", "inference.json", task=task, device="cpu")
    assert (c.task, c.task_id, c.tasks) == (task, "task", tuple(TASKS)) and c.overrides == {"task": task}
    assert c.source_id in p and c.sampler == "Generator"
    assert [o.key for o in c.outputs] == p.get_parsed_content("target_keys")
    assert list(c.input_keys) == p.get_parsed_content("input_keys")  # sr: "lr", made from the one volume it reads
    assert c.ingest == {"prostate_dce": "prostate", "brain_t1c": "brain", "sr": None}[task]


def test_multi_task_contracts_are_read_and_checked(tmp_path):
    from common.bundle import read_contract

    b = tmp_path / "b"
    (b / "configs").mkdir(parents=True)
    one = {"source_id": "case_dir", "input_keys": ["x"], "outputs": [{"key": "y", "label": "Y"}]}
    spec = {"task_id": "mode", "default_task": "b", "sampler": "S", "tasks": {"a": {**one, "ingest": "brain"}}}
    spec["tasks"]["b"] = {**one, "ingest": None, "no_study": "one volume", "sampler": "T"}
    (b / "configs" / "contract.json").write_text(json.dumps(spec))
    assert (read_contract(b).task, read_contract(b).sampler, read_contract(b).ingest) == ("b", "T", None)
    a = read_contract(b, overrides={"mode": "a", "other": 1})
    assert (a.task, a.sampler, a.ingest, a.overrides) == ("a", "S", "brain", {"mode": "a"})
    with pytest.raises(ValueError, match=r"contract.json: --mode 'c': not one of a, b"):
        read_contract(b, "c")
    with pytest.raises(ValueError, match="the bundle has one task, not 'a'"):
        read_contract("resdce", "a")
    assert read_contract("resdce").overrides == {} and read_contract("resdce").tasks == ()
    assert (
        read_contract("ressrdiff").outputs[0].target == "@volume_key"
        and read_contract("d3m").outputs[0].target == "t1c"
    )


def test_multi_gpu_config_trains_both_networks_with_two_processes_on_cpu(prostate, tmp_path):
    """``torchrun`` with multi_gpu_train.json (gloo here, nccl on CUDA): the generator and the
    discriminator are both wrapped in DDP (one forward of real and fake pairs through the
    discriminator, so its gradients are reduced once per step) and both are saved, unwrapped, with
    their optimizers, at the iteration reached."""
    state = h.train_two_processes(CONFIGS, tmp_path / "ddp", "--dataset_dir", str(prostate), *TINY)
    assert {"model", "discriminator", "optimizer", "d_optimizer"} <= set(state)
    for key in ("model", "discriminator"):  # saved without DDP's "module." prefix: loads into a plain network
        assert not any(k.startswith("module.") for k in state[key])
    assert state["d_optimizer"]["state"] and state["optimizer"]["state"]  # both networks took their steps
