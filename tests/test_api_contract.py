"""ExecutionClient and ExecutionPool implement one contract: zmqruntime.api.ExecutionAPI.

mypy checks the same statically (the end of pool.py); this checks it at run time, on the
signatures and on a real server, so a method renamed or a parameter dropped in one of
them fails here.
"""

from __future__ import annotations

import inspect

import pytest

from zmqruntime import ExecutionAPI, ExecutionClient, ExecutionPool

CONTRACT = sorted(
    name
    for name, member in vars(ExecutionAPI).items()
    if inspect.isfunction(member) and not name.startswith("_")
)
SQUARE = "def run(ctx, config):\n    ctx.emit('y', config.x * config.x)\n"


def test_the_contract_names_the_execute_status_results_methods():
    assert {"execute", "get_status", "wait", "get_results", "cancel", "stream"} <= set(CONTRACT)


@pytest.mark.parametrize("cls", [ExecutionClient, ExecutionPool])
@pytest.mark.parametrize("name", CONTRACT)
def test_each_implementation_accepts_every_call_the_contract_allows(cls, name):
    wanted = inspect.signature(getattr(ExecutionAPI, name))
    got = inspect.signature(getattr(cls, name))
    params = dict(got.parameters)
    for pname, p in wanted.parameters.items():
        assert pname in params, f"{cls.__name__}.{name} lacks parameter {pname!r}"
        q = params.pop(pname)
        assert q.kind == p.kind, f"{cls.__name__}.{name}({pname}): {q.kind} != {p.kind}"
        assert q.default == p.default, f"{cls.__name__}.{name}({pname}) default differs"
    for pname, q in params.items():  # extras must be optional, so contract calls still work
        assert q.default is not inspect.Parameter.empty, f"{cls.__name__}.{name}({pname})"
        assert q.kind == inspect.Parameter.KEYWORD_ONLY, f"{cls.__name__}.{name}({pname})"


def test_a_function_written_against_the_contract_runs_on_a_client_and_on_a_pool(server):
    def squares(api: ExecutionAPI, xs: list[int]) -> list[int]:
        ids = [api.execute(SQUARE, config={"x": x}) for x in xs]
        return [api.get_results(i, timeout=60)["y"][0] for i in ids]

    client = ExecutionClient(server.port, auto_spawn=False)
    pool = ExecutionPool([f"tcp://127.0.0.1:{server.port}"])
    try:
        for api in (client, pool):
            assert isinstance(api, ExecutionAPI)
            assert squares(api, [2, 3]) == [4, 9]
    finally:
        pool.close()
        client.close()
