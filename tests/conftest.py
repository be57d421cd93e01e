"""Session setup shared by every test."""

import pytest


@pytest.fixture(scope="session")
def wandb_run(tmp_path_factory):
    """A short run with wandb on (offline) and a fake API key (`SECRET`) in the environment:
    the metrics tests read its files, the security tests look for the key in them."""
    from moe_scale.train.config import load_config
    from moe_scale.train.trainer import Trainer
    from tests.trainer_utils import CONFIGS, SECRET, tiny

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_API_KEY", SECRET)
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    cfg = load_config(CONFIGS / "lm_debug.yaml", tiny(run_dir, "logging.wandb=true", "train.max_steps=10",
                                                      "train.eval_every=10", "checkpoint.every=5"))
    Trainer(cfg).fit()
    mp.undo()
    import wandb

    wandb.teardown()  # stops wandb's service process, which writes the run file in the background
    return run_dir


# The per-test time limits are hang guards, not speed checks: multi-process tests detect a hang
# themselves when their ranks stop using CPU time (moe_scale.distributed.launch.ProgressClock),
# so a loaded machine may take several times their idle duration without failing.
HANG_GUARD_FACTOR = 3


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is not None and marker.args:
            item.add_marker(pytest.mark.timeout(marker.args[0] * HANG_GUARD_FACTOR), append=False)
