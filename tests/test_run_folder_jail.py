"""A run folder is a jail with one writer: nothing a run writes, moves or deletes resolves outside it, whatever
links it holds, and a second process cannot write it while the first lives (nor be locked out once it died)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tokencredit.rl.sft import SFTConfig, SFTTrainer
from tokencredit.run_folders import RunFolderBusyError, claim_run_folder, holds_lock, release_run_folder
from tokencredit.runs import CheckpointManager, MetricsLogger, RunFolderError, read_metrics, remove_path
from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

WORDS = "a b c d e f g h".split()
PROMPTS = [f"{WORDS[i]} {WORDS[(i + 1) % 8]}" for i in range(8)]
RESPONSES = [f"{WORDS[(3 * i + 2) % 8]} {WORDS[(5 * i + 7) % 8]}" for i in range(8)]


def sft(run, **kw):
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_causal_lm(len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    kw = {"max_steps": 2, **kw}
    cfg = SFTConfig(output_dir=str(run), batch_size=4, save_every=1, learning_rate=1e-2, progress=False,
                    log_tensorboard=False, mixed_precision="no", **kw)
    return SFTTrainer(cfg, policy=model, tokenizer=tok, prompts=PROMPTS, responses=RESPONSES)


# ------------------------------------------------------------------------------------------------ links
@pytest.mark.parametrize("resume", [True, False])
def test_a_dangling_metrics_link_is_refused_and_nothing_is_written_outside(tmp_path, resume):
    run, outside = tmp_path / "run", tmp_path / "outside" / "stolen.jsonl"
    outside.parent.mkdir()
    if resume:
        sft(run).train()
        (run / "metrics.jsonl").unlink()
    else:
        run.mkdir()
    (run / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(RunFolderError, match=r"symbolic links \(metrics.jsonl -> .*stolen.jsonl\)"):
        sft(run, resume=resume).train()
    assert not outside.exists()
    assert not holds_lock(run)  # a refused run leaves the folder unlocked


def test_a_linked_checkpoint_folder_is_refused_on_resume_and_its_target_untouched(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "precious"
    sft(run, keep_checkpoints=3).train()
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    (run / "checkpoints" / "step-00000009").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RunFolderError, match="step-00000009 -> .*precious"):
        sft(run, resume=True, max_steps=4).train()
    assert (outside / "keep.txt").read_text() == "mine"


def test_checkpoint_manager_never_follows_a_link_it_meets(tmp_path):
    # Used directly (without a claim), pruning must neither crash on a linked folder nor delete what it points to.
    run, outside = tmp_path / "run", tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    manager = CheckpointManager(run, keep_last=1)
    manager.dir.mkdir(parents=True)
    (manager.dir / "step-00000001").symlink_to(outside, target_is_directory=True)
    (manager.dir / ".tmp-step-00000002").symlink_to(outside, target_is_directory=True)
    assert manager.latest() is None  # a link is not a checkpoint of ours
    tmp = manager.begin(2)  # the planted temp link is unlinked, not emptied
    assert not tmp.is_symlink() and (outside / "keep.txt").exists()
    (tmp / "w").write_text("x")
    manager.commit(2)
    manager.begin(3)
    (manager.dir / ".tmp-step-00000003" / "w").write_text("y")
    manager.commit(3)  # prunes step 2; the linked step-1 is not ours to prune
    assert [p.name for p in manager._complete()] == ["step-00000003"]
    assert (outside / "keep.txt").read_text() == "mine"


def test_remove_path_unlinks_a_link_and_keeps_its_target(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "f").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    remove_path(link)
    assert not os.path.lexists(link) and (target / "f").exists()
    remove_path(tmp_path / "missing")  # nothing there is not an error


def test_metrics_logger_refuses_a_linked_log_even_without_a_claim(tmp_path):
    outside = tmp_path / "elsewhere.jsonl"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(RunFolderError, match="symbolic link"):
        MetricsLogger(tmp_path / "run", tensorboard=False)
    assert not outside.exists()


def test_a_hard_linked_log_is_copied_before_appending(tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"step": 1}\n')
    (tmp_path / "run").mkdir()
    os.link(outside, tmp_path / "run" / "metrics.jsonl")
    with MetricsLogger(tmp_path / "run", tensorboard=False) as logger:
        logger.log(2, {"x": 1.0})
    assert outside.read_text() == '{"step": 1}\n'  # the other name still sees only its own content
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_overwrite_moves_a_folder_with_links_aside_without_following_them(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "precious"
    sft(run).train()
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    (run / "checkpoints" / "step-00000009").symlink_to(outside, target_is_directory=True)
    sft(run, overwrite=True).train()  # the old run (and its link) is deleted once the new run has a checkpoint
    assert (outside / "keep.txt").read_text() == "mine"
    assert not any(p.name.startswith("run.replaced-") for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ one writer
HOLDER = textwrap.dedent("""
    import sys
    from tokencredit.run_folders import claim_run_folder
    claim_run_folder(sys.argv[1], {}, resume=True, allow_changed_settings=True)
    print("locked", flush=True)
    sys.stdin.read()  # hold the folder until the test closes stdin or kills this process
""")


def start_holder(run):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_cannot_resume_a_run_another_process_is_writing(tmp_path):
    run = tmp_path / "run"
    sft(run).train()
    before = read_metrics(run)
    holder = start_holder(run)
    try:
        with pytest.raises(RunFolderBusyError, match=rf"being written by another process \(pid {holder.pid} "):
            sft(run, resume=True, max_steps=4).train()
        assert read_metrics(run) == before  # the refused run wrote nothing
        with pytest.raises(RunFolderBusyError):
            sft(run, overwrite=True).train()  # nor may a fresh run move the live one aside
        assert read_metrics(run) == before
    finally:
        holder.kill()
        holder.wait()
    # kill -9 leaves no stuck lock: the kernel dropped it with the process.
    history = sft(run, resume=True, max_steps=4).train()
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]


def test_the_lock_is_released_when_a_run_ends_or_is_refused(tmp_path):
    run = tmp_path / "run"
    sft(run).train()
    assert not holds_lock(run)
    with pytest.raises(RunFolderError, match="already holds a run"):
        claim_run_folder(run, {}, resume=False)
    assert not holds_lock(run)
    holder = start_holder(run)  # another process can take it now
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0


def test_a_process_may_claim_its_own_folder_again_and_the_lock_names_it(tmp_path):
    run = tmp_path / "run"
    claim_run_folder(run, {}, resume=True)
    claim_run_folder(run, {}, resume=True)  # re-entrant within one process
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    release_run_folder(run)
    assert not holds_lock(run)


def test_a_planted_lock_link_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RunFolderError, match="symbolic link"):
        claim_run_folder(run, {}, resume=True)
    assert not (tmp_path / "elsewhere").exists()


def test_two_resuming_command_line_runs_do_not_interleave(tmp_path):
    """The issue's case end to end: two processes resume one folder at once; one runs, one is refused (rc 2)."""
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_run_folder_jail import sft
        trainer = sft(sys.argv[1], resume=True, max_steps=int(sys.argv[2]))
        step = trainer.step
        def slow_step(*a, **k):
            time.sleep(1.5)  # the two processes overlap whatever their start-up times
            return step(*a, **k)
        trainer.step = slow_step
        from tokencredit.runs import RunFolderError
        try:
            trainer.train()
        except RunFolderError as exc:
            print("refused:", exc, file=sys.stderr)
            sys.exit(2)
    """)
    sft(run).train()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(run), "8"], env=env, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    codes = sorted(p.wait(timeout=300) for p in procs)
    errors = [p.stderr.read() for p in procs]
    assert codes == [0, 2], errors
    assert any("being written by another process" in e for e in errors)
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 9))


def test_lock_file_is_not_a_run_marker(tmp_path):
    run = tmp_path / "run"
    claim_run_folder(run, {}, resume=False)
    release_run_folder(run)
    claim_run_folder(run, {}, resume=False)  # a folder holding only the lock file is still empty of runs
    release_run_folder(run)
