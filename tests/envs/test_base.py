"""The environment interface and registry: lookup, errors that name the value and the fix,
duplicate registration, and the search factory's handling of env settings and resources."""

from __future__ import annotations

import pytest

from skyrl_mtp.config.schema import EnvConfig
from skyrl_mtp.envs import EnvStep, SearchEnv, TextEnv, get_env, known_envs, make_search_env, register_env
from skyrl_mtp.envs import base
from skyrl_mtp.envs.retrieval import BM25Index, RetrievalClient


def test_search_is_registered():
    assert "search" in known_envs()
    assert get_env("search") is make_search_env


@pytest.mark.parametrize("name", ["serach", None, ""])
def test_unknown_env_names_the_value_and_the_fix(name):
    with pytest.raises(ValueError, match=rf"unknown env {name!r} \(env.name\); known envs: \[.*'search'.*\]"
                                         r".*null for single-turn"):
        get_env(name)


def test_register_custom_env_and_duplicates(monkeypatch):
    monkeypatch.setattr(base, "_ENVS", dict(base._ENVS))

    class Echo(TextEnv):
        stop = ("\n",)

        def reset(self, example):
            self.n = 0

        def step(self, model_text):
            self.n += 1
            return EnvStep(model_text.upper(), float(self.n == 2), self.n == 2, {"turns": 1.0})

    @register_env("echo")
    def make_echo(config, resources):
        return Echo()

    env = get_env("echo")(EnvConfig(name="echo"), None)
    env.reset({"prompt": "p", "answer": "a", "extra": {}})
    assert env.step("hi") == EnvStep("HI", 0.0, False, {"turns": 1.0})
    assert env.step("x").done
    env.close()
    assert "echo" in known_envs()
    with pytest.raises(ValueError, match="env 'echo' is already registered"):
        register_env("echo")(lambda c, r: Echo())
    register_env("echo", override=True)(lambda c, r: Echo())
    with pytest.raises(ValueError, match="expects a factory function"):
        register_env("bad")(42)
    with pytest.raises(ValueError, match="env name must be a non-empty string"):
        register_env("")


def test_text_env_is_abstract():
    with pytest.raises(TypeError):
        TextEnv()


def test_search_factory_settings_and_resources():
    with pytest.raises(ValueError, match=r"env.retrieval_url is null and no retrieval client was passed"):
        make_search_env(EnvConfig(name="search"), None)
    env = make_search_env(EnvConfig(name="search", retrieval_url="http://127.0.0.1:8123", timeout_s=1.5, topk=5), None)
    assert isinstance(env, SearchEnv) and env.topk == 5
    assert env.retriever.url == "http://127.0.0.1:8123/retrieve" and env.retriever.timeout_s == 1.5
    shared = RetrievalClient("http://127.0.0.1:8124", 2.0)
    assert make_search_env(EnvConfig(name="search", retrieval_url="http://ignored:1"), shared).retriever is shared
    index = BM25Index([{"id": "x", "contents": "the code of kavo is 1234"}])
    env = make_search_env(EnvConfig(name="search", topk=1), index)
    env.reset({"prompt": "Q code of kavo ? A", "answer": "1234", "extra": {}})
    assert env.step("<search>kavo</search>").observation == "<information>the code of kavo is 1234</information>"
    with pytest.raises(ValueError, match=r"retrieval url 'localhost:8000' must look like http://HOST:PORT"):
        make_search_env(EnvConfig(name="search", retrieval_url="localhost:8000"), None)
    with pytest.raises(ValueError, match=r"topk must be an integer >= 1 \(env.topk\)"):
        make_search_env(EnvConfig(name="search", topk=0), index)
