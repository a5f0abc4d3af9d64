"""LoRA recovery: lowers the loss, merges exactly, resumes exactly, fails cleanly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _tiny_lm import byte_tokenizer, pruned_tiny, tiny_model

from minillm.model.adapters import adapter_for
from minillm.model.io import load_pruned, save_pruned
from minillm.model.surgery import layer_records
from minillm.recover import main
from minillm.recovery.config import SELF_DATA_STEPS, RecoverConfig
from minillm.recovery.loss import recovery_loss, teacher_topk
from minillm.recovery.teacher import teacher_targets
from minillm.recovery.train import add_lora, merged_float32, total_steps

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
def pruned_dir(tmp_path):
    path = tmp_path / "pruned"
    path.mkdir()
    save_pruned(pruned_tiny(), byte_tokenizer(), path)
    (path / "report.json").write_text(json.dumps({"criterion": "magnitude", "ratio": 0.5}))
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def mean_loss(model, ids: torch.Tensor, seqlen: int) -> float:
    """Independent next-token CE of ``model`` over the ``seqlen`` chunks of ``ids``."""
    chunks = ids[: ids.numel() // seqlen * seqlen].view(-1, seqlen)
    with torch.no_grad():
        logits = model(chunks).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunks[:, 1:].reshape(-1)).item()


def recover_args(pruned_dir, text_file, out, *extra):
    return [
        str(pruned_dir),
        "--data",
        str(text_file),
        "--out",
        str(out),
        "--seqlen",
        "32",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--quiet",
        "--device",
        "cpu",
        "--teacher",
        "none",
        *extra,
    ]


def test_recovery_lowers_training_loss_and_keeps_pruned_sizes(pruned_dir, text_file, tmp_path):
    out = tmp_path / "recovered"
    assert main(recover_args(pruned_dir, text_file, out, "--max-steps", "30")) == 0
    before, after = load_pruned(pruned_dir), load_pruned(out)
    ids = byte_tokenizer()(TEXT, return_tensors="pt").input_ids.reshape(-1)
    assert mean_loss(after, ids, 32) < mean_loss(before, ids, 32) - 0.2
    adapter = adapter_for(after)
    assert layer_records(after, adapter) == layer_records(before, adapter)
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == "magnitude"  # the pruning report is kept
    curve = report["recovery"]["loss_curve"]
    assert len(curve) == 30 and curve[-1]["loss"] < curve[0]["loss"]
    assert not (tmp_path / "recovered.work").exists()


def test_merged_model_logits_equal_unmerged_peft_model():
    model = pruned_tiny()
    peft_model = add_lora(model, RecoverConfig(model="", out="", dropout=0.0))
    with torch.no_grad():  # LoRA B starts at zero: give the adapters a real effect
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    peft_model.eval()
    ids = torch.randint(1, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = peft_model.get_base_model()(ids).logits.clone()
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
        adapted = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapters matter
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=1e-4)
    assert base_logits.shape == merged.shape


def test_resume_from_checkpoint_reproduces_uninterrupted_run(pruned_dir, text_file, tmp_path):
    work = tmp_path / "work"
    common = ["--max-steps", "6", "--save-every", "3", "--dropout", "0", "--work-dir", str(work)]
    assert main(recover_args(pruned_dir, text_file, tmp_path / "full", *common)) == 0
    assert (work / "checkpoint.pt").is_file()  # written at step 3 of 6
    resumed_out = tmp_path / "resumed"
    assert main(recover_args(pruned_dir, text_file, resumed_out, *common, "--resume")) == 0
    full, resumed = load_pruned(tmp_path / "full"), load_pruned(resumed_out)
    for (name, a), (_, b) in zip(
        full.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name
    curve = json.loads((resumed_out / "report.json").read_text())["recovery"]["loss_curve"]
    assert [c["step"] for c in curve] == [1, 2, 3, 4, 5, 6]


def test_missing_data_file_is_one_line_error_and_leaves_no_directory(pruned_dir, tmp_path, capsys):
    out = tmp_path / "recovered"
    assert main(recover_args(pruned_dir, tmp_path / "nope.jsonl", out)) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"python -m minillm.recover: error: --data: no such file '{tmp_path / 'nope.jsonl'}'"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_alpaca_jsonl_data_and_distillation_from_teacher(pruned_dir, tmp_path):
    rows = [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Add.", "input": "1+1", "output": "2"},
    ] * 4
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = tmp_path / "teacher"
    tiny_model("llama", seed=1).save_pretrained(teacher)
    byte_tokenizer().save_pretrained(teacher)
    out = tmp_path / "recovered"
    argv = [
        str(pruned_dir),
        "--data",
        str(data),
        "--teacher",
        str(teacher),
        "--kd-weight",
        "0.5",
        "--max-steps",
        "3",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    curve = json.loads((out / "report.json").read_text())["recovery"]["loss_curve"]
    assert all({"ce", "kl", "loss"} <= set(c) for c in curve)
    assert all(c["loss"] == pytest.approx(0.5 * c["ce"] + 0.5 * c["kl"]) for c in curve)


def test_kd_loss_is_kl_of_teacher_to_student_on_labelled_tokens():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[1, 3:] = -100
    _, parts = recovery_loss(student, labels, teacher_topk(teacher, 7), kd_weight=1.0)
    kls = []
    for b in range(2):
        for t in range(4):
            if labels[b, t + 1] != -100:
                p = teacher[b, t].softmax(-1)
                kls.append((p * (p.log() - student[b, t].log_softmax(-1))).sum())
    assert parts["kl"] == pytest.approx(torch.stack(kls).mean().item(), rel=1e-5)
    _, same = recovery_loss(student, labels, teacher_topk(student, 7), kd_weight=1.0)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("batch", "length", "kd_weight", "temperature", "with_teacher"),
    [(3, 6, 0.3, 2.0, True), (2, 50, 1.0, 1.0, True), (2, 50, 1.0, 1.0, False)],
)
def test_loss_and_gradient_match_torch_reference(
    batch, length, kd_weight, temperature, with_teacher
):
    # (2, 50): 100 rows, more than one chunk of the fused loss
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(batch, length, 11, generator=gen, requires_grad=True)
    teacher = torch.randn(batch, length, 11, generator=gen)
    labels = torch.randint(0, 11, (batch, length), generator=gen)
    labels[0, 4:] = -100
    labels[-1, 1:3] = -100
    # all 11 tokens kept: the top-k KL is the full KL
    targets = teacher_topk(teacher, 11, temperature) if with_teacher else None
    loss, parts = recovery_loss(student, labels, targets, kd_weight, temperature)
    valid = labels[:, 1:].reshape(-1) != -100
    flat_s = student[:, :-1].reshape(-1, 11)[valid]
    flat_t = teacher[:, :-1].reshape(-1, 11)[valid]
    ce = F.cross_entropy(flat_s, labels[:, 1:].reshape(-1)[valid])
    kl = (
        F.kl_div(
            F.log_softmax(flat_s / temperature, -1),
            F.log_softmax(flat_t / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
    reference = (1 - kd_weight) * ce + kd_weight * kl if with_teacher else ce
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert parts["ce"] == pytest.approx(ce.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, student)
    (ref_grad,) = torch.autograd.grad(reference, student)
    assert torch.allclose(grad, ref_grad, atol=1e-6)


@pytest.mark.parametrize(("k", "temperature"), [(1, 1.0), (3, 1.0), (4, 2.0)])
def test_topk_kl_is_kl_of_distributions_with_other_tokens_in_one_bucket(k, temperature):
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(2, 40, 9, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 40, 9, generator=gen) * 3
    labels = torch.randint(0, 9, (2, 40), generator=gen)
    labels[1, 30:] = -100
    loss, parts = recovery_loss(
        student, labels, teacher_topk(teacher, k, temperature), 1.0, temperature
    )
    # reference: both distributions coarsened to the teacher's k tokens + one bucket, autograd
    valid = labels[:, 1:].reshape(-1) != -100
    p = (teacher[:, :-1].reshape(-1, 9)[valid] / temperature).softmax(-1)
    q = (student[:, :-1].reshape(-1, 9)[valid] / temperature).softmax(-1)
    top = p.topk(k, -1).indices
    rest = torch.ones_like(p, dtype=torch.bool).scatter(-1, top, False)

    def coarse(d):
        return torch.cat([d.gather(-1, top), (d * rest).sum(-1, keepdim=True)], -1)

    pc, qc = coarse(p), coarse(q)
    reference = (pc * (pc.log() - qc.log())).sum(-1).mean() * temperature**2
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert parts["kl"] == pytest.approx(reference.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, student)
    (ref_grad,) = torch.autograd.grad(reference, student)
    assert torch.allclose(grad, ref_grad, atol=1e-6)


def test_teacher_targets_of_padded_batches_equal_each_example_alone():
    teacher = tiny_model("llama", seed=1).eval()
    gen = torch.Generator().manual_seed(3)
    examples = [torch.randint(1, 200, (n,), generator=gen).tolist() for n in (9, 4, 12, 7, 2)]
    cfg = RecoverConfig(model="", out="", batch_size=3, kd_topk=5, kd_temperature=2.0, quiet=True)
    targets = teacher_targets(teacher, examples, 0, cfg)
    for example, (logp, ids) in zip(examples, targets, strict=True):
        with torch.no_grad():
            logits = teacher(torch.tensor([example])).logits[0]
        ref = (logits / 2.0).log_softmax(-1).topk(5, -1)
        assert logp.shape == ids.shape == (len(example), 5) and ids.dtype == torch.int32
        assert torch.allclose(logp, ref.values, atol=1e-5)
        assert torch.equal(ids.long(), ref.indices)


def test_bfloat16_training_merges_adapters_into_float32_weights(pruned_dir):
    cfg = RecoverConfig(model=str(pruned_dir), out="", device="cpu")
    bf16 = add_lora(load_pruned(pruned_dir, dtype="bfloat16"), cfg)
    with torch.no_grad():
        for name, param in bf16.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    assert {p.dtype for n, p in bf16.named_parameters() if "lora_" in n} == {torch.float32}
    merged = merged_float32(bf16, cfg, "bfloat16")
    reference = add_lora(load_pruned(pruned_dir), cfg)  # float32 base, the same adapters
    adapters = {n: t for n, t in bf16.state_dict().items() if "lora_" in n}
    reference.load_state_dict(adapters, strict=False)
    reference.eval()
    ids = torch.randint(1, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        got = merged(ids).logits
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_both_precisions_lower_the_loss_and_save_float32(
    pruned_dir, text_file, tmp_path, precision
):
    out = tmp_path / precision
    args = recover_args(pruned_dir, text_file, out, "--max-steps", "30", "--precision", precision)
    assert main(args) == 0
    after = load_pruned(out)
    assert {p.dtype for p in after.parameters()} == {torch.float32}
    ids = byte_tokenizer()(TEXT, return_tensors="pt").input_ids.reshape(-1)
    assert mean_loss(after, ids, 32) < mean_loss(load_pruned(pruned_dir), ids, 32) - 0.2
    assert json.loads((out / "report.json").read_text())["recovery"]["precision"] == precision


def test_step_budget_is_fixed_for_self_data_and_counted_in_epochs_for_files():
    # 512 self-written examples, batch 8: 64 steps per epoch
    epochs = -(-SELF_DATA_STEPS // 64)
    assert total_steps(512, RecoverConfig(model="", out="")) == (SELF_DATA_STEPS, epochs)
    from_file = RecoverConfig(model="", out="", data="train.txt", epochs=3)
    assert total_steps(100, from_file) == (13 * 3, 3)  # ceil(100 / 8) = 13 steps per epoch
    from_file.max_steps = 7
    assert total_steps(100, from_file) == (7, 1)


@pytest.fixture
def dense_and_pruned(tmp_path):
    """A tiny dense model dir and a model pruned from it whose report.json records it."""
    dense = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense)
    byte_tokenizer().save_pretrained(dense)
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    save_pruned(pruned_tiny(), byte_tokenizer(), pruned)
    report = {"criterion": "flap", "config": {"model": str(dense), "gguf_file": None}}
    (pruned / "report.json").write_text(json.dumps(report))
    return dense, pruned


def test_default_distills_from_the_dense_model_recorded_in_the_report(dense_and_pruned, tmp_path):
    dense, pruned = dense_and_pruned
    out = tmp_path / "recovered"
    work = tmp_path / "work"
    argv = [str(pruned), "--out", str(out), "--self-samples", "4", "--seqlen", "16"]
    argv += ["--batch-size", "2", "--max-steps", "2", "--work-dir", str(work), "--quiet"]
    assert main([*argv, "--precision", "float32"]) == 0  # the reference below samples in float32
    rec = json.loads((out / "report.json").read_text())["recovery"]
    assert rec["teacher"] == str(dense)
    assert rec["tokens_trained"] == 2 * 2 * 16
    # pure distillation by default: the loss is the KL, not the CE
    assert all(
        c["loss"] == pytest.approx(c["kl"]) and c["kl"] != c["ce"] for c in rec["loss_curve"]
    )
    # the training text is the teacher's: seeded sampling of the dense model's whole
    # distribution (the default --self-top-k 0) reproduces it
    from minillm.data import self_generated

    def written(model) -> list[list[int]]:
        return self_generated(model, byte_tokenizer(), 4, 16, 0, top_k=None)[0].tolist()

    trained_on = [json.loads(line) for line in (work / "self_data.jsonl").read_text().splitlines()]
    teacher_text, student_text = written(tiny_model("llama")), written(pruned_tiny())
    assert trained_on == teacher_text != student_text
    # the top-k kept while writing is the teacher's top-k of one forward over the written text
    kept = torch.load(work / "self_targets.pt")
    cfg = RecoverConfig(model="", out="", batch_size=3, quiet=True)
    passed = teacher_targets(tiny_model("llama"), trained_on, 0, cfg)
    passed = tuple(torch.stack(t) for t in zip(*passed, strict=True))
    # compared as full-vocabulary vectors: tokens of equal log-prob may come in either order
    assert torch.allclose(_scattered(kept)[:, :-1], _scattered(passed)[:, :-1], atol=1e-5)
    assert (kept[0][:, -1] == -torch.inf).all()  # the last position predicts nothing


def _scattered(targets) -> torch.Tensor:
    """Top-k ``(logp, ids)`` as ``[..., V]`` log-probs, -inf off the top-k."""
    logp, ids = targets
    vocab = len(byte_tokenizer())
    return torch.full((*ids.shape[:-1], vocab), -torch.inf).scatter(-1, ids.long(), logp)


def test_missing_recorded_teacher_is_one_line_error(dense_and_pruned, tmp_path, capsys):
    dense, pruned = dense_and_pruned
    for path in dense.iterdir():
        path.unlink()
    dense.rmdir()
    assert main([str(pruned), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m minillm.recover: error: --teacher: cannot load the dense ")
    assert str(dense) in err and "--teacher none" in err and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_no_report_and_no_teacher_is_one_line_error(tmp_path, capsys):
    plain = tmp_path / "plain"
    tiny_model("llama").save_pretrained(plain)
    byte_tokenizer().save_pretrained(plain)
    assert main([str(plain), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"python -m minillm.recover: error: --teacher: no {plain / 'report.json'} records the "
        f"dense model {plain} was pruned from; pass --teacher DIR (or 'embedded'), "
        "or --teacher none to train without one"
    )


def test_empty_training_text_is_one_line_error_naming_the_file(pruned_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(recover_args(pruned_dir, empty, tmp_path / "r")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"python -m minillm.recover: error: --data: {empty} is empty (no training text)"
    assert not (tmp_path / "r").exists()


def test_negative_self_top_k_is_one_line_error(pruned_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main([str(pruned_dir), "--out", str(out), "--self-top-k", "-1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "python -m minillm.recover: error: --self-top-k: must be >= 0 (0: no truncation), got -1"
    )
    assert not out.exists()
