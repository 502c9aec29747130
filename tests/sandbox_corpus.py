"""The attack corpus of the sandbox for remote trace bodies (data; the tests are
``tests/test_sandbox.py`` in-process and ``tests/test_sandbox_server.py``
against a real server).

Each :class:`Attack` is an attempt a stranger could send as a trace body.  It
is either refused by the static checks (``line`` and ``construct`` given:
``validate`` names that line and construct), refused when it runs
(``outcome="refused"``: the run-time allowlist, a missing name, a read-only
view), or runs harmlessly (``outcome="runs"``: it worked on a copy).  In every
case the test counts it contained only when, afterwards, the canary file does
not exist, the loopback listener saw no connection, and neither the secret
(an environment variable of the server) nor the server's model path appears
in the answer, the printed lines or the error.

Placeholders in sources: ``{canary}`` (a file path that must stay absent),
``{port}`` (a loopback port where the test listens), ``{secret}`` (the name
of the secret environment variable).  ``kind="session"`` bodies run as
``model.session(...)`` bodies (they open traces themselves); ``tracer`` is
the trace's ``as`` name otherwise.  ``server=True`` marks the subset that is
also sent to a real server.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SECRET_ENV = "SEETHROUGH_TEST_SECRET"


@dataclass(frozen=True)
class Attack:
    name: str
    source: str
    line: int | None = None  # refused statically at this line...
    construct: str | None = None  # ...naming this construct
    outcome: str = "refused"  # when not static: "refused" (fails when run) or "runs" (harmless)
    group: str = "classic"
    kind: str = "trace"
    says: str = ""  # part of the refusal's message
    server: bool = False  # also sent to a real server (tests/test_sandbox_server.py)

    @property
    def static(self) -> bool:
        return self.construct is not None


@dataclass(frozen=True)
class OptionAttack:
    """Options of the request itself (not the body), refused with a 400 naming them."""

    name: str
    kind: str
    generate: dict = field(default_factory=dict)
    kwargs: dict = field(default_factory=dict)
    says: str = ""


# -- the classic escapes: imports, dunder walks, frames, string lookups, classes, torch surfaces ---------

CLASSIC: list[Attack] = [
    # imports of dangerous modules
    Attack("import os", "import os\nos.system('touch {canary}')", 1, "import os"),
    Attack("import sys", "x = 1\nimport sys", 2, "import sys"),
    Attack("import subprocess", "import subprocess as sp", 1, "import subprocess"),
    Attack("import builtins", "import builtins\nbuiltins.open('{canary}', 'w')", 1, "import builtins"),
    Attack("import importlib", "import importlib", 1, "import importlib"),
    Attack("import ctypes", "import ctypes", 1, "import ctypes"),
    Attack("import pickle", "import pickle", 1, "import pickle"),
    Attack("import marshal", "import marshal", 1, "import marshal"),
    Attack("from io import", "from io import open as o", 1, "from io import"),
    Attack("import socket", "import socket", 1, "import socket"),
    Attack("import shutil", "import shutil", 1, "import shutil"),
    Attack("from pathlib", "from pathlib import Path\nPath('{canary}').touch()", 1, "from pathlib import"),
    Attack("import numpy", "import numpy as np", 1, "import numpy"),
    Attack("relative import", "from . import wire", 1, "from . import"),
    Attack("star import", "from math import *", 1, "from math import"),
    Attack("torch submodule import", "import torch.utils.cpp_extension", 1, "import torch.utils.cpp_extension"),
    Attack("from torch import private", "from torch import _C", 1, "from torch import _C"),
    Attack("__import__", "__import__('os').system('touch {canary}')", 1, "__import__"),
    # dunder walks
    Attack("subclasses walk", "y = 1\nsubs = ().__class__.__bases__[0].__subclasses__()", 2, "__subclasses__"),
    Attack("class of tensor", "x.__class__", 1, "x.__class__"),
    Attack("function globals", "def f():\n    pass\nb = f.__globals__['__builtins__']", 3, "__globals__"),
    Attack("function code", "def f():\n    pass\nc = f.__code__", 3, "f.__code__"),
    Attack("module dict", "model.__dict__", 1, "model.__dict__"),
    Attack("builtins name", "__builtins__['open']('{canary}', 'w')", 1, "__builtins__"),
    Attack("print self", "print.__self__", 1, "__self__"),
    Attack("import torch as t; t.__dict__", "import torch as t\nt.__dict__['load']", 2, "t.__dict__"),
    # frames
    Attack("generator frame", "def g():\n    yield 1\nit = g()\nglobs = it.gi_frame.f_back.f_globals", 4, "f_globals"),
    Attack("generator code", "def g():\n    yield 1\ncode = g().gi_code", 3, "gi_code"),
    Attack("coroutine", "async def c():\n    pass", 1, "async def"),
    Attack("await", "def f():\n    x = 1\n    return [y async for y in x]", 3, "async for"),
    Attack("traceback frame", "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    f = e.__traceback__.tb_frame", 4, "__traceback__"),
    Attack("tb_next without dunder", "def f(tb):\n    return tb.tb_next.tb_frame.f_globals", 2, "f_globals"),
    # string-driven attribute lookups
    Attack("str.format walk", 'leak = "{0.__class__}".format(x)', 1, ".format"),
    Attack("str.format on a name", 'fmt = "{0.__globals__}"\nleak = fmt.format(print)', 2, "fmt.format"),
    Attack("format_map", 'str.format_map("{x.__class__}", {"x": x})', 1, "format_map"),
    Attack("getattr", "getattr(x, '__class__')", 1, "getattr"),
    Attack("setattr", "setattr(model, 'forward', print)", 1, "setattr"),
    Attack("delattr", "delattr(model, 'fc1')", 1, "delattr"),
    Attack("hasattr", "hasattr(x, 'T')", 1, "hasattr"),
    Attack("vars", "vars(model)", 1, "vars"),
    Attack("globals", "g = globals()['__builtins__']", 1, "globals"),
    Attack("locals", "def f():\n    return locals()", 2, "locals"),
    Attack("dir", "dir(x)", 1, "dir"),
    Attack("eval", "eval('1 + 1')", 1, "eval"),
    Attack("exec", "exec('import os')", 1, "exec"),
    Attack("compile", "compile('1', 'f', 'exec')", 1, "compile"),
    Attack("open", "open('{canary}', 'w').write('owned')", 1, "open"),
    Attack("breakpoint", "breakpoint()", 1, "breakpoint"),
    Attack("input", "input()", 1, "input"),
    Attack("help", "help(x)", 1, "help"),
    Attack("exit", "exit(1)", 1, "exit"),
    Attack("quit", "quit()", 1, "quit"),
    # the class machinery
    Attack("type()", "t = type(x)", 1, "type"),
    Attack("object", "object.__subclasses__()", 1, "__subclasses__"),
    Attack("object()", "o = object()", 1, "object"),
    Attack("super", "def f():\n    return super()", 2, "super"),
    Attack("class definition", "class Evil:\n    pass", 1, "class Evil"),
    Attack("mro", "bases = ValueError.mro()", 1, "ValueError.mro"),
    Attack("memoryview", "memoryview(b'abc')", 1, "memoryview"),
    # torch surfaces
    Attack("torch.load", "import torch\ntorch.load('{canary}')", 2, "torch.load"),
    Attack("torch.from_file", "import torch\ntorch.from_file('{canary}')", 2, "torch.from_file"),
    Attack("torch._C", "import torch\ntorch._C", 2, "torch._C"),
    Attack("torch.hub.load", "import torch\ntorch.hub.load('a', 'b')", 2, "torch.hub.load"),
    Attack("set default dtype", "import torch\ntorch.set_default_dtype(torch.float64)", 2, "set_default_dtype"),
    Attack("numpy tofile", "x.numpy().tofile('{canary}')", 1, "tofile"),
    Attack("numpy", "arr = x.numpy()", 1, "x.numpy"),
    Attack("untyped storage", "s = x.untyped_storage()", 1, "untyped_storage"),
    Attack("storage", "s = x.storage()", 1, "x.storage"),
    Attack("uninitialized memory", "leak = x.new_empty(1000)", 1, "new_empty"),
    Attack("resize", "x.resize_(10**6)", 1, "resize_"),
    Attack("share memory", "x.share_memory_()", 1, "share_memory_"),
    Attack("cuda", "y = x.cuda()", 1, "x.cuda"),
    Attack("grad_fn hook", "def f(g):\n    return g\nx.grad_fn.register_hook(f)", 3, "register_hook"),
    Attack("tensor hook", "x.register_hook(print)", 1, "register_hook"),
    # the served model
    Attack("model._model", "m = model._model", 1, "model._model"),
    Attack("forward hook", "h = model.fc1.register_forward_hook(print)", 1, "register_forward_hook"),
    Attack("save_pretrained", "model.config.save_pretrained('{canary}')", 1, "save_pretrained"),
    Attack("load_state_dict", "model.load_state_dict({})", 1, "load_state_dict"),
    Attack("module apply", "model.apply(print)", 1, "model.apply"),
    Attack("replace forward", "model.fc1.forward = print", 1, "model.fc1.forward"),
    Attack("replace weight", "model.fc1.weight = None", 1, "model.fc1.weight"),
    Attack("delete attribute", "del model.fc1", 1, "model.fc1"),
    Attack("train mode", "model.train()", 1, "model.train"),
    Attack("to_empty", "model.to_empty(device='cpu')", 1, "to_empty"),
    Attack("push_to_hub", "model.push_to_hub('me/model')", 1, "push_to_hub"),
    Attack("tokenizer backend", "tok.backend_tokenizer.save('{canary}')", 1, "backend_tokenizer"),
    # syntax that smuggles
    Attack("decorator", "@print\ndef f():\n    pass", 1, "@print"),
    Attack("lambda smuggling a builtin", "steal = lambda: __import__", 1, "__import__"),
    Attack("lambda smuggling a walk", "steal = lambda o: o.__globals__", 1, "__globals__"),
    Attack("nested function", "def outer():\n    def inner():\n        return open('{canary}', 'w')\n    return inner", 3, "open"),
    Attack("comprehension hiding a walk", "c = [s for s in ().__class__.__base__.__subclasses__()]", 1, "__subclasses__"),
    Attack("walrus", "if (o := open):\n    pass", 1, "open"),
    Attack("rebinding a builtin", "getattr = print", 1, "getattr"),
    Attack("private argument", "def f(_secret):\n    return _secret", 1, "_secret"),
    Attack("private keyword", "print(1, __class__=2)", 1, "__class__"),
    Attack("match attribute walk", "match x:\n    case int(__class__=c):\n        pass", 2, "__class__"),
    Attack("global statement", "def f():\n    global x\n    x = 1", 2, "global x"),
    Attack("bare except", "try:\n    pass\nexcept:\n    pass", 3, "except:"),
    Attack("catch BaseException", "try:\n    pass\nexcept BaseException:\n    pass", 3, "BaseException"),
    Attack("frame prefix", "f = x.f_locals", 1, "f_locals"),
    # refused only when run
    Attack("torch.save at run time", "import torch\ntorch.save(x, '{canary}')"),
    Attack("torch.ops", "import torch as t\nt.ops.aten.add"),
    Attack("torch.hub listing", "import torch\ntorch.hub.list('me/repo')"),
    Attack("torch.utils via alias", "import torch as t\nt.utils.cpp_extension"),
    Attack("torch.jit", "import torch\ntorch.jit.script(print)"),
    Attack("torch.cuda", "import torch\ntorch.cuda.init()", 2, "torch.cuda"),
    Attack("torch.backends", "import torch\ntorch.backends.cudnn"),
    Attack("torch.distributed", "import torch\ntorch.distributed"),
    Attack("torch.multiprocessing", "import torch\ntorch.multiprocessing", 2, "torch.multiprocessing"),
    Attack("torch.library", "import torch\ntorch.library"),
    Attack("torch.classes", "import torch\ntorch.classes"),
    Attack("torch.compile", "import torch\ntorch.compile(print)", 2, "torch.compile"),
    Attack("functional reaching torch", "import torch.nn.functional as F\nF.handle_torch_function"),
    Attack("legacy constructor", "import torch\nleak = torch.Tensor(10000)"),
    Attack("writing to a module proxy", "import torch\ntorch.output = print"),
    Attack("deleting from a module proxy", "import torch\ndel torch.grad"),
    Attack("os.system without import", "os.system('touch {canary}')", 1, "os.system"),
    Attack("os without import", "os.makedirs('{canary}')"),
    Attack("environ without import", "environ['" + SECRET_ENV + "'] = '1'"),
    Attack("undefined file helper", "handle = open_file('{canary}', 'w')"),
]


A = Attack
NET, SECRET, CODE, FILES, STATE, INTERNALS, MEMORY, CLASSES = (
    "network and the client", "secrets and paths", "code execution", "files", "state of later requests",
    "library internals", "raw memory", "classes")
LOOPBACK = "http://127.0.0.1:{port}"

NEW: list[Attack] = [
    # 1. network and the operator's credentials: the client inside a body
    A("nested remote trace", f'with model.trace("x", remote=True, host="{LOOPBACK}"):\n    pass', 1, "remote=",
      group=NET, kind="session", server=True),
    A("nested host", f'with model.trace("x", host="{LOOPBACK}"):\n    pass', 1, "host=", group=NET, kind="session"),
    A("nested api key", 'with model.trace("x", api_key="k"):\n    pass', 1, "api_key=", group=NET, kind="session"),
    A("nested non-blocking session", "with model.session(blocking=False):\n    pass", 1, "blocking=", group=NET,
      kind="session"),
    A("remote options by unpacking", f'opts = {{"remote": True, "host": "{LOOPBACK}", "api_key": "k"}}\n'
      'with model.trace("x", **opts):\n    h = model.transformer.h[0].output.save()', group=NET, kind="session",
      says="client", server=True),
    A("remote session by unpacking", f'with model.session(**{{"remote": True, "host": "{LOOPBACK}"}}):\n    pass',
      group=NET, kind="session", says="client", server=True),
    A("remote generate by unpacking", f'opts = {{"remote": True, "host": "{LOOPBACK}"}}\n'
      'with model.generate("x", max_new_tokens=1, **opts):\n    pass', group=NET, kind="session", says="remote"),
    A("the tracer's job", "job = tracer.job", group=NET, says="Tracer", server=True),
    A("the client's key through the job", "print(tracer.job.client.api_key)", group=NET, says="job", server=True),
    A("an unentered tracer's job", 'handle = model.trace("x").job', group=NET, kind="session"),
    A("attributes of the entry point", "k = model.trace.api_key", group=NET, says="function"),
    A("import seethrough", "import seethrough", 1, "import seethrough", group=NET),
    A("the client module", "from seethrough.remote.client.connection import RemoteClient", 1, "from seethrough", group=NET),
    A("http.client", "import http.client", 1, "import http.client", group=NET),
    A("urllib", f'import urllib.request\nurllib.request.urlopen("{LOOPBACK}")', 1, "import urllib", group=NET),
    A("torch hub download", f'import torch\ntorch.hub.load_state_dict_from_url("{LOOPBACK}/w")', 2,
      "load_state_dict_from_url", group=NET, server=True),
    A("torch hub by alias", f'import torch as t\nhub = t.hub\nhub.download_url_to_file("{LOOPBACK}", "{{canary}}")',
      group=NET, says="torch.hub", server=True),
    A("torch.distributed rendezvous", 'import torch\ntorch.distributed.init_process_group("gloo", '
      'init_method="tcp://127.0.0.1:{port}", rank=0, world_size=2)', group=NET, server=True),
    A("tokenizer download", f'model.tokenizer.from_pretrained("{LOOPBACK}")', 1, "from_pretrained", group=NET),
    A("socket", 'import socket\nsocket.create_connection(("127.0.0.1", {port}))', 1, "import socket", group=NET),
    # secrets, environment and server paths
    A("environment without import", 'print(environ["{secret}"])', group=SECRET),
    A("os.environ", 'import os\nprint(os.environ["{secret}"])', 1, "import os", group=SECRET),
    A("tokenizer init kwargs", "kw = model.tokenizer.init_kwargs", group=SECRET, says="tokenizer", server=True),
    A("config path", "p = model.config.name_or_path", group=SECRET, says="name_or_path", server=True),
    A("config private path", "p = model.config.to_dict().get('_name_or_path')\nprint(p)", outcome="runs",
      group=SECRET),
    A("model path", "p = model.name_or_path", group=SECRET, says="name_or_path", server=True),
    A("inner model path", "p = model.transformer.name_or_path", group=SECRET, says="name_or_path"),
    A("tokenizer path", "p = model.tokenizer.name_or_path", group=SECRET, says="tokenizer"),
    A("tokenizer files", "p = model.tokenizer.vocab_files_names", group=SECRET, says="tokenizer"),
    A("print the config", "print(model.config)\nprint(model.config.to_dict())", outcome="runs", group=SECRET,
      server=True),
    A("print the tokenizer", "print(model.tokenizer)\nprint(repr(model.tokenizer))", outcome="runs", group=SECRET,
      server=True),
    A("print the generation config", "print(model.generation_config.to_dict())", outcome="runs", group=SECRET),
    A("save the config", "c = model.config.to_dict()", outcome="runs", group=SECRET, server=True),
    A("the config's commit", "c = model.config.to_dict()['_commit_hash']", group=SECRET, says="_commit_hash"),
    # 2. code execution through generation options
    A("custom_generate keyword", 'with model.generate("x", max_new_tokens=1, custom_generate="{canary}", '
      "trust_remote_code=True):\n    pass", 1, "custom_generate=", group=CODE, kind="session", server=True),
    A("trust_remote_code keyword", 'with model.trace("x", trust_remote_code=True):\n    pass', 1,
      "trust_remote_code=", group=CODE, kind="session"),
    A("custom_generate by unpacking", 'opts = {"custom_generate": "{canary}", "trust_remote_code": True}\n'
      'with model.generate("x", max_new_tokens=1, **opts):\n    pass', group=CODE, kind="session",
      says="custom_generate", server=True),
    A("a streamer callback", 'opts = {"streamer": print}\nwith model.generate("x", max_new_tokens=1, **opts):\n'
      "    pass", group=CODE, kind="session", says="streamer"),
    A("a generation config object", 'opts = {"generation_config": None}\n'
      'with model.generate("x", max_new_tokens=1, **opts):\n    pass', group=CODE, kind="session"),
    A("a forward option that loads files", 'opts = {"cache_dir": "{canary}"}\nwith model.trace("x", **opts):\n'
      "    pass", group=CODE, kind="session", says="cache_dir"),
    A("contrastive search (Hub code)", 'opts = {"penalty_alpha": 0.6, "top_k": 4}\n'
      'with model.generate("x", max_new_tokens=1, **opts):\n    pass', group=CODE, kind="session",
      says="penalty_alpha"),
    # 3. files through library objects
    A("the tokenizer's model", "bpe = model.tokenizer.model", group=FILES, says="tokenizer", server=True),
    A("write files through the tokenizer's model", 'model.tokenizer.model(vocab={}, merges=[]).save("{canary}", "x")',
      group=FILES, server=True),
    A("tokenizer pre-tokenizer", "p = model.tokenizer.pre_tokenizer", group=FILES),
    A("config class", "c = model.config.config_class", group=FILES, says="config", server=True),
    A("config file reader", 'd = model.config.get_config_dict("{canary}")', group=FILES, says="config"),
    A("config to JSON", "s = model.config.to_json_string()", group=FILES),
    A("config to a JSON file", 'model.config.to_json_file("{canary}")', 1, "to_json_file", group=FILES),
    A("tokenizer save_vocabulary", 'model.tokenizer.save_vocabulary("{canary}")', 1, "save_vocabulary", group=FILES),
    A("tokenizer NumPy output", 'ids = model.tokenizer("hi", return_tensors="np")', group=FILES, says="return_tensors",
      server=True),
    A("encode to NumPy", 'ids = model.tokenizer.encode("hi", return_tensors="np")', group=FILES, says="return_tensors"),
    A("tokenizer options by unpacking", 'ids = model.tokenizer("hi", **{"return_tensors": "jax"})', group=FILES),
    A("tokenizer unknown option", 'ids = model.tokenizer("hi", tokenizer_file="{canary}")', group=FILES),
    # raw memory and other processes
    A("data_ptr", "p = x.data_ptr()", group=MEMORY, says="data_ptr", server=True),
    A("storage offset", "p = x.storage_offset()", group=MEMORY),
    A("shared memory flag", "p = x.is_shared()", group=MEMORY),
    A("pinned memory", "p = x.pin_memory()", group=MEMORY),
    A("autograd node", "n = x.grad_fn", group=MEMORY),
    A("autograd node of an activation", "n = model.transformer.h[0].output[0].grad_fn.next_functions", group=MEMORY),
    A("record_stream", "r = x.record_stream", group=MEMORY),
    A("map_ with a callback", "x.map_(x, print)", group=MEMORY),
    A("weight data_ptr", "p = model.lm_head.weight.data_ptr()", group=MEMORY, server=True),
    A("dlpack", "import torch\nc = torch.utils.dlpack.to_dlpack(x)", group=MEMORY),
    # 4-6. state that later requests would see
    A("tokenizer input names", 'model.tokenizer.model_input_names.append("evil")', outcome="runs", group=STATE,
      server=True),
    A("tokenizer special tokens", 'model.tokenizer.all_special_tokens.append("evil")', outcome="runs", group=STATE),
    A("tokenizer vocabulary", 'v = model.tokenizer.get_vocab()\nv["hello"] = 0\nw = model.tokenizer.vocab\n'
      'w.clear()', outcome="runs", group=STATE),
    A("tokenizer padding side", 'model.tokenizer.padding_side = "left"', 1, "model.tokenizer.padding_side",
      group=STATE),
    A("tokenizer add tokens", 'model.tokenizer.add_tokens(["evil"])', 1, "add_tokens", group=STATE),
    A("config update", 'model.config.update({"_attn_implementation": "x"})', group=STATE, says="config", server=True),
    A("config dict copy", 'd = model.config.to_dict()\nd["n_layer"] = 0\nd.clear()', outcome="runs", group=STATE),
    A("config attribute", "model.config.n_layer = 0", 1, "model.config.n_layer", group=STATE),
    A("generation config update", "model.generation_config.update(max_length=1)", group=STATE, server=True),
    A("Parameter class grad", "import torch\ntorch.nn.Parameter.grad = torch.ones(1)", group=CLASSES,
      says="torch.nn.Parameter", server=True),
    A("Tensor class grad", "import torch\ntorch.Tensor.grad = None", group=CLASSES, says="class", server=True),
    A("Tensor class method", "import torch\ntorch.Tensor.add = print", 2, "torch.Tensor.add", group=CLASSES),
    A("Tensor class read", "import torch\nf = torch.Tensor.add", group=CLASSES, says="class"),
    A("int class method", "f = int.bit_length", group=CLASSES, says="class"),
    A("exception class", "a = ValueError.args", group=CLASSES),
    A("nn.Module class", "import torch\nm = torch.nn.Module", group=CLASSES),
    A("nn.Linear class", "import torch\nlayer = torch.nn.Linear(2, 2)", group=CLASSES),
    A("from torch.nn import Parameter", "from torch.nn import Parameter", 1, "torch.nn.Parameter", group=CLASSES),
    A("weight grad", "import torch\nw = model.lm_head.weight\nw.grad = torch.ones_like(w)", group=STATE,
      says="served weight", server=True),
    A("weight add_", "model.lm_head.weight.add_(1)", group=STATE, says="weight", server=True),
    A("weight view slice", "import torch\nwith torch.no_grad():\n    model.lm_head.weight.T[0] = 0", group=STATE,
      says="weight", server=True),
    A("weight in-place add", "import torch\nwith torch.no_grad():\n    model.transformer.wte.weight[0] += 1",
      group=STATE, says="weight"),
    A("weight alias zero_", "model.transformer.wte.weight.detach().zero_()", group=STATE, says="weight",
      server=True),
    A("weight .data", "d = model.transformer.h[0].ln_1.weight.data", group=STATE, says="weight"),
    A("weight requires_grad_", "model.transformer.h[0].attn.c_attn.weight.requires_grad_(False)", group=STATE),
    A("module forward", "f = model.transformer.h[0].attn.forward", group=STATE),
    A("module list append", "model.transformer.h.append(model.transformer.h[0])", group=STATE),
    A("eval mode", "model.eval()", 1, "model.eval", group=STATE),
    A("inference mode switch", "model.requires_grad_(False)", group=STATE),
    A("move the model", 'model.to("meta")', group=STATE, server=True),
    A("generation config attribute", "model.generation_config.max_length = 3", 1,
      "model.generation_config.max_length", group=STATE),
    A("module attribute through an alias", "model.layers[0].output_attentions = True", 1,
      "model.layers[0].output_attentions", group=STATE),
    # library internals
    A("tokenizer added tokens", "t = model.tokenizer.added_tokens_encoder", group=INTERNALS),
    A("tokenizer decoder", "d = model.tokenizer.decoder", group=INTERNALS),
    A("KV cache methods", "u = model.output.past_key_values.update", group=INTERNALS, server=True),
    A("KV cache layers", "u = model.output.past_key_values.layers", group=INTERNALS),
    A("submodule config update", "u = model.transformer.h[0].attn.config.update", group=INTERNALS),
    A("config attribute map", "m = model.config.attribute_map", group=INTERNALS),
    A("dispatch", "m = model.dispatch()", group=INTERNALS),
    A("edit", "e = model.edit()", 1, "model.edit", group=INTERNALS),
    A("module zero_grad", "model.transformer.h[0].attn.zero_grad()", group=INTERNALS),
    A("a missing module attribute", "h = model.transformer.h[0].attn.forward_hooks", outcome="refused",
      group=INTERNALS, says="has no submodule or attribute"),
    A("module's state_dict", "s = model.state_dict()", group=INTERNALS),
    A("class pattern reading attributes", "match x:\n    case int(real=r):\n        pass", 2, "int(real=r)",
      group=INTERNALS),
    A("Generator internals", "import torch\ng = torch.Generator()\ns = g.graphsafe_get_state()", group=INTERNALS),
    A("traceback through with_traceback", 'e = ValueError("x")\nt = e.with_traceback(None)', group=INTERNALS),
    A("generator throw", "def g():\n    yield 1\nit = g()\nt = it.throw", group=INTERNALS),
    A("torch.autograd", "import torch\ng = torch.autograd.grad", group=INTERNALS),
    A("torch.func", "import torch\nv = torch.func.vmap", group=INTERNALS),
    A("thread count", "import torch\ntorch.set_num_threads(64)", 2, "set_num_threads", group=INTERNALS),
    A("torch.random", "import torch\ns = torch.random.seed()", group=INTERNALS),
    A("torch.utils.data", "import torch\nd = torch.utils.data", group=INTERNALS),
]

OPTION_ATTACKS: list[OptionAttack] = [
    OptionAttack("custom_generate option", "generate", {"custom_generate": "/tmp/x", "max_new_tokens": 1},
                 says="custom_generate"),
    OptionAttack("trust_remote_code option", "generate", {"trust_remote_code": True}, says="trust_remote_code"),
    OptionAttack("assistant model", "generate", {"assistant_model": "gpt2"}, says="assistant_model"),
    OptionAttack("contrastive search", "generate", {"penalty_alpha": 0.6}, says="penalty_alpha"),
    OptionAttack("group beam search", "generate", {"num_beam_groups": 2}, says="num_beam_groups"),
    OptionAttack("DoLa", "generate", {"dola_layers": "high"}, says="dola_layers"),
    OptionAttack("a streamer", "generate", {"streamer": "x"}, says="streamer"),
    OptionAttack("a model path", "generate", {"pretrained_model_name_or_path": "gpt2"}, says="pretrained"),
    OptionAttack("generate input custom_generate", "generate", kwargs={"custom_generate": "/tmp/x"},
                 says="custom_generate"),
    OptionAttack("trace input trust_remote_code", "trace", kwargs={"trust_remote_code": True}, says="trust_remote_code"),
    OptionAttack("trace input cache_dir", "trace", kwargs={"cache_dir": "/tmp"}, says="cache_dir"),
    OptionAttack("trace input remote", "trace", kwargs={"remote": True}, says="remote"),
    OptionAttack("trace input host", "trace", kwargs={"host": "http://127.0.0.1:1"}, says="host"),
]

ATTACKS: list[Attack] = CLASSIC + NEW


# -- "nothing persists": state a body changes, or tries to ---------------------------------------------

# Sensitive to everything a body could have changed: tokenization, config,
# generation config, weights, gradients, the RNG.
CLEAN_SOURCE = """import torch
h0 = model.transformer.h[0].output[0].save()
final = model.transformer.ln_f.input
logits = model.output.logits.save()
loss = logits.sum()
with loss.backward():
    final_grad = final.grad.save()
weight_grad = model.transformer.h[0].mlp.c_fc.weight.grad.clone().save()
torch.manual_seed(7)
draw = torch.rand(3).save()
ids = model.tokenizer("hello world")["input_ids"]
names = list(model.tokenizer.model_input_names)
config = model.config.to_dict()
generation = model.generation_config.to_dict()
print(len(model.tokenizer), model.tokenizer.eos_token_id)
"""
STATE_FIELDS = ("h0", "logits", "final_grad", "weight_grad", "draw", "ids", "names", "config", "generation")
# A sampled generation from a seed: the RNG, the generation config, the tokenizer's padding.
CLEAN_GENERATE_SOURCE = """import torch
torch.manual_seed(11)
steps = []
for step in tracer.iter[:]:
    steps.append(model.lm_head.output[:, -1].save())
tokens = tracer.result.save()
"""
CLEAN_GENERATE_OPTIONS = {"max_new_tokens": 3, "do_sample": True, "top_k": 20}


@dataclass(frozen=True)
class Mutation:
    name: str
    source: str
    kind: str = "trace"


M = Mutation
MUTATIONS: list[Mutation] = [
    M("tokenizer input names", 'model.tokenizer.model_input_names.append("token_type_ids")'),
    M("tokenizer special tokens list", 'model.tokenizer.all_special_tokens.append("x")'),
    M("tokenizer vocabulary dict", 'v = model.tokenizer.get_vocab()\nv["hello"] = 1\nv.clear()'),
    M("tokenizer vocab property", "model.tokenizer.vocab.clear()"),
    M("tokenizer special tokens map", 'model.tokenizer.special_tokens_map["pad_token"] = "x"'),
    M("tokenizer call with left padding", 'ids = model.tokenizer(["a", "b c d"], padding=True, padding_side="left")'),
    M("tokenizer call with truncation", 'ids = model.tokenizer("a b c d e", truncation=True, max_length=1)'),
    M("tokenizer padding side attribute", 'model.tokenizer.padding_side = "left"'),
    M("config dict copy", 'd = model.config.to_dict()\nd["n_layer"] = 0\nd["id2label"][0] = "evil"'),
    M("config nested value", 'm = model.config.id2label\nm[0] = "evil"\nm.clear()'),
    M("config update", 'model.config.update({"_attn_implementation": "x"})'),
    M("config attribute", "model.config.use_cache = False"),
    M("generation config dict", 'g = model.generation_config.to_dict()\ng["max_length"] = 1'),
    M("generation config update", "model.generation_config.update(do_sample=False, top_k=1)"),
    M("Parameter class grad", "import torch\ntorch.nn.Parameter.grad = torch.ones(1)"),
    M("Tensor class attribute", "import torch\ntorch.Tensor.grad = None"),
    M("global seed", "import torch\ntorch.manual_seed(0)"),
    M("grad mode", "import torch\ntorch.set_grad_enabled(False)"),
    M("weight gradient", "import torch\nw = model.transformer.h[0].mlp.c_fc.weight\nw.grad = torch.ones_like(w)"),
    M("accumulated weight gradients", "loss = model.output.logits.sum()\nloss.backward()"),
    M("weight in place", "model.transformer.h[0].mlp.c_fc.weight.add_(1)"),
    M("weight through a view", "import torch\nwith torch.no_grad():\n    model.lm_head.weight.T[0] = 0"),
    M("weight requires_grad", "model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)"),
    M("module dtype", "import torch\nmodel.to(torch.float16)"),
    M("module list", "layer = model.transformer.h.pop(0)"),
    M("module forward", "model.transformer.h[0].attn.forward = print"),
    M("module mode", "model.train()"),
    M("an edited output", "model.transformer.h[0].output[0][:] = 0\nh = model.output.logits.save()"),
    M("a skipped module", "model.transformer.h[1].skip(model.transformer.h[1].input)"),
    M("a cache of every module", "c = tracer.cache()\nh = model.output.logits.save()"),
    M("an edited gradient", "h = model.transformer.h[1].output\nloss = model.output.logits.sum()\n"
      "with loss.backward():\n    h.grad[:] = 0"),
    M("an error after an edit", 'model.transformer.h[0].output[0][:] = 1\nraise ValueError("stop here")'),
    M("stop after an edit", "model.transformer.h[0].output[0][:] = 2\ntracer.stop()"),
    M("a session that edits", 'with model.trace("a b"):\n    model.transformer.h[0].output[0][:] = 0\n'
      'with model.trace("c d"):\n    h = model.transformer.h[1].output[0].save()', kind="session"),
    M("a generation that edits", 'with model.generate("a b", max_new_tokens=2) as gen:\n'
      '    for step in gen.iter[:]:\n        model.transformer.h[0].output[0][:] = 0', kind="session"),
]
