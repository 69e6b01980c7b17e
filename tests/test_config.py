"""The environment contract: values, defaults, one clear message per bad value, README in step."""
import os
import re

import pytest

from comfy_xdit_patch import config as cfg
from comfy_xdit_patch.tools import cli
from comfy_xdit_patch.tools.cli import env_tables


def test_defaults_follow_the_hardware():
    assert cfg.load({}, gpus=0).enabled is False
    assert cfg.load({}, gpus=1).enabled is False
    on = cfg.load({}, gpus=4)
    assert on.enabled and on.workers == 4 and on.use_gpu and on.compile
    cpu = cfg.load({"COMFY_XDIT": "1"}, gpus=0)
    assert cpu.enabled and cpu.workers == 2 and not cpu.use_gpu and not cpu.compile
    assert cfg.load({"COMFY_XDIT_COMPILE": "0"}, gpus=2).compile is False
    assert cfg.load({"COMFY_XDIT_DEVICES": "1,3"}, gpus=4).workers == 2
    assert cfg.load({"COMFY_XDIT": "0"}, gpus=8).enabled is False


def test_explicit_values():
    c = cfg.load({"COMFY_XDIT": "1", "COMFY_XDIT_WORKERS": "4", "COMFY_XDIT_PARALLEL": "cfg=2,ulysses=2",
                  "COMFY_XDIT_FALLBACK": "error", "COMFY_XDIT_TIMEOUT": "2.5",
                  "COMFY_XDIT_RAY_ADDRESS": "10.0.0.1:6379"}, gpus=0)
    assert c.parallel == cfg.Mesh(cfg=2, ulysses=2, ring=1)
    assert (c.fallback, c.timeout, c.ray_address) == ("error", 2.5, "10.0.0.1:6379")


def test_vae_decodes_on_the_ranks_from_a_size():
    assert cfg.load({}, gpus=2).vae_min_pixels == 2048 * 2048  # FLUX from 2048², a 480p Wan clip from 13 frames
    assert cfg.load({"COMFY_XDIT_VAE_MIN_PIXELS": "0"}, gpus=2).vae_min_pixels == 0  # every decode
    assert cfg.load({"COMFY_XDIT_VAE_MIN_PIXELS": "off"}, gpus=2).vae_min_pixels is None


@pytest.mark.parametrize("env,var", [
    ({"COMFY_XDIT": "maybe"}, "COMFY_XDIT"),
    ({"COMFY_XDIT_WORKERS": "0"}, "COMFY_XDIT_WORKERS"),
    ({"COMFY_XDIT_WORKERS": "3"}, "COMFY_XDIT_WORKERS"),  # 2 GPUs visible
    ({"COMFY_XDIT_DEVICES": "0,0"}, "COMFY_XDIT_DEVICES"),
    ({"COMFY_XDIT_DEVICES": "5"}, "COMFY_XDIT_DEVICES"),
    ({"COMFY_XDIT_PARALLEL": "ulysses=3"}, "COMFY_XDIT_PARALLEL"),  # product != ranks
    ({"COMFY_XDIT_PARALLEL": "tensor=2"}, "COMFY_XDIT_PARALLEL"),
    ({"COMFY_XDIT_FALLBACK": "retry"}, "COMFY_XDIT_FALLBACK"),
    ({"COMFY_XDIT_TIMEOUT": "-1"}, "COMFY_XDIT_TIMEOUT"),
    ({"COMFY_XDIT_ATTENTION": "flash"}, "COMFY_XDIT_ATTENTION"),
    ({"COMFY_XDIT_EXCHANGE": "nvshmem"}, "COMFY_XDIT_EXCHANGE"),
    ({"COMFY_XDIT_PRESTART": "soon"}, "COMFY_XDIT_PRESTART"),
    ({"COMFY_XDIT_DIAG_LOOPBACK": "maybe"}, "COMFY_XDIT_DIAG_LOOPBACK"),
    ({"COMFY_XDIT_VAE_MIN_PIXELS": "2048x2048"}, "COMFY_XDIT_VAE_MIN_PIXELS"),
])
def test_bad_values_name_the_variable_and_the_accepted_values(env, var):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(env, gpus=2)
    assert e.value.var == var
    assert var in str(e.value) and "accepted" in str(e.value)


ROOT = os.path.dirname(os.path.dirname(__file__))
DOCS = {"README.md": {"user"}, "docs/configuration.md": {"tuning", "diagnostics"}}


@pytest.mark.parametrize("name", sorted(DOCS))
def test_generated_variable_tables_are_current(name):
    """README.md has the user table, docs/configuration.md the tuning and diagnostics ones, all generated."""
    text = open(os.path.join(ROOT, name)).read()
    assert env_tables(text) == text, f"{name}'s variable tables are stale: comfy-xdit env-table --write {name}"
    assert set(re.findall(r"<!-- env-table: (\w+)", text)) == DOCS[name]


def test_every_variable_has_a_documented_audience():
    assert {v.audience for v in cfg.ENV_VARS} == set().union(*DOCS.values()) == set(cfg.AUDIENCES)
    readme = open(os.path.join(ROOT, "README.md")).read()
    for v in cfg.ENV_VARS:  # tuning and diagnostics knobs stay out of the user's page
        assert (f"| `{v.name}` |" in readme) == (v.audience == "user"), v.name


def test_env_table_write_regenerates_only_marked_tables(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- env-table: tuning -->\n| stale |\n\nafter\n")
    assert cli.main(["env-table", "--write", str(doc)]) == 0
    assert doc.read_text() == "intro\n<!-- env-table: tuning -->\n" + cfg.markdown_table("tuning") + "\n\nafter\n"


def test_loopback_is_a_diagnostics_setting_not_an_exchange_choice():
    with pytest.raises(cfg.ConfigError):
        cfg.load({"COMFY_XDIT_EXCHANGE": "loopback"}, gpus=2)
    assert cfg.load({"COMFY_XDIT_DIAG_LOOPBACK": "1"}, gpus=2).exchange == "loopback"
    assert cfg.load({"COMFY_XDIT_DIAG_LOOPBACK": "1", "COMFY_XDIT_EXCHANGE": "collective"}, gpus=0).exchange == "loopback"
    assert cfg.load({"COMFY_XDIT_DIAG_LOOPBACK": "0"}, gpus=2).exchange == "auto"


def test_peer_copies_need_gpus():
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load({"COMFY_XDIT_EXCHANGE": "peer-copy"}, gpus=0)
    assert e.value.var == "COMFY_XDIT_EXCHANGE"
    assert cfg.load({"COMFY_XDIT_EXCHANGE": "peer-copy"}, gpus=2).exchange == "peer-copy"
    assert cfg.load({}, gpus=2).exchange == "auto" and cfg.load({}, gpus=2).prestart
