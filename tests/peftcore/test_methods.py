"""One suite for every method in peftcore.methods.METHODS: a method gets all of it by being listed.

For each method, with its default config on T5: inject (unchanged outputs where the method
promises it; only the adapter trains), merge/unmerge, save/load in peft's format, logits and
adapter gradients equal to peft's on the same weights (every adapter tensor moved away from its
init first), the parameter count on the t5-base shape against peft's, bad configs refused by
name, and no file outside the method's module naming its classes.
"""

import ast
import copy
import dataclasses
import sys
import typing
import warnings
from pathlib import Path

import peft
import pytest
import torch
from helpers import build_t5, move_off_init, t5_batch

import peftcore
from peftcore import methods, peft_format
from peftcore.checkpoint import to_peft_config
from peftcore.surgery import adapter_layers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
METHODS = {method.name: method for method in methods.METHODS}
ROOT = Path(__file__).resolve().parents[2]


def injected(method, seed: int = 0, model=None):
    """A t5-tiny with the method's default config, every trainable tensor moved off its init."""
    return move_off_init(inject(method, model), seed)


def inject(method, model=None):
    model = build_t5("t5-tiny") if model is None else model
    return peftcore.inject(model, method.config())


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def batch_with_padding():
    batch = t5_batch()
    batch["attention_mask"][1, -2:] = 0
    return batch


@pytest.mark.parametrize("name", METHODS)
def test_inject_trains_only_the_adapter_and_starts_where_the_method_says(name):
    method, base = METHODS[name], build_t5("t5-tiny")
    model = inject(method, copy.deepcopy(base))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    adapter = {id(p) for _, layer in adapter_layers(model) for p in layer.adapter_params().values()}
    assert trainable == adapter and trainable
    assert peftcore.count_parameters(model).trainable == sum(
        p.numel() for _, layer in adapter_layers(model) for p in layer.adapter_params().values()
    )
    batch = batch_with_padding()
    same = torch.allclose(logits(model, batch), logits(base, batch), atol=1e-5)
    assert same is method.identity_at_init
    with peftcore.disable_adapters(model):
        torch.testing.assert_close(logits(model, batch), logits(base, batch))


@pytest.mark.parametrize("name", METHODS)
def test_merge_and_unmerge_round_trip_or_refuse_plainly(name):
    method = METHODS[name]
    model, batch = injected(method), batch_with_padding()
    adapted = logits(model, batch)
    if isinstance(method, methods.InputMethod):
        with pytest.raises(ValueError, match="cannot be merged"):
            peftcore.merge(model)
        return
    peftcore.merge(model)
    torch.testing.assert_close(logits(model, batch), adapted, atol=1e-5, rtol=1e-5)
    peftcore.unmerge(model)
    torch.testing.assert_close(logits(model, batch), adapted, atol=1e-5, rtol=1e-5)
    plain = peftcore.unload(model, merge=True)
    assert not list(adapter_layers(plain))
    torch.testing.assert_close(logits(plain, batch), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_unload_without_merge_gives_back_the_base(name):
    base = build_t5("t5-tiny")
    model = peftcore.unload(injected(METHODS[name], model=copy.deepcopy(base)), merge=False)
    assert not list(adapter_layers(model)) and not hasattr(model, "peftcore_config")
    batch = batch_with_padding()
    torch.testing.assert_close(logits(model, batch), logits(base, batch))


def grads_in_file_names(model, write) -> dict:
    """Each adapter tensor's gradient, named as the adapter file names that tensor: the gradients
    are written into the parameters, and ``write`` returns the file's tensors."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p.grad)
    return write()


@pytest.mark.parametrize("name", METHODS)
def test_peft_reads_ours_and_we_read_peft_with_equal_logits_and_gradients(name, tmp_path):
    method, base, batch = METHODS[name], build_t5("t5-tiny"), batch_with_padding()
    ours = injected(method, model=copy.deepcopy(base))
    if not peft_format.holds(method.config()):  # peft has no such method: its files cannot hold it
        with pytest.raises(ValueError, match="peft's files cannot hold it"):
            peftcore.save_adapter(ours, tmp_path / "ours")
        return
    peftcore.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        torch.testing.assert_close(logits(reader, batch), logits(ours, batch), atol=1e-5, rtol=1e-5)
        # the same file into a trainable peft model, for the gradients
        data = {**to_peft_config(ours.peftcore_config, ours), "inference_mode": False}
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PeftConfig.from_peft_type(**data))
        peft.set_peft_model_state_dict(theirs, peftcore.checkpoint.read_adapter_tensors(tmp_path / "ours"))
    torch.testing.assert_close(logits(theirs, batch), logits(ours, batch), atol=1e-5, rtol=1e-5)  # it loaded

    for model in (ours, theirs):  # eval mode: no dropout, so the two backward passes are comparable
        model.eval()(**batch).loss.backward()
    ours_grads = grads_in_file_names(
        ours,
        lambda: (
            peftcore.save_adapter(ours, tmp_path / "g"),
            peftcore.checkpoint.read_adapter_tensors(tmp_path / "g"),
        )[1],
    )
    theirs_grads = grads_in_file_names(theirs, lambda: peft.get_peft_model_state_dict(theirs))
    data, translator = (
        to_peft_config(ours.peftcore_config, ours),
        peft_format.for_config(ours.peftcore_config),
    )
    ours_grads = translator.read_file_tensors(ours_grads, data)
    theirs_grads = translator.read_file_tensors(theirs_grads, data)
    assert ours_grads.keys() == theirs_grads.keys()
    assert any(g.abs().sum() > 0 for g in ours_grads.values())  # gradients that prove something
    for key in ours_grads:
        torch.testing.assert_close(ours_grads[key], theirs_grads[key], atol=1e-6, rtol=1e-5, msg=key)

    theirs.save_pretrained(tmp_path / "peft")  # the weights are now the gradients: any values will do
    again = peftcore.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(again, batch), logits(theirs, batch), atol=1e-5, rtol=1e-5)
    round_trip = peftcore.load_adapter(copy.deepcopy(base), tmp_path / "ours")
    assert type(round_trip.peftcore_config) is method.config


@pytest.mark.parametrize("name", METHODS)
def test_parameter_count_on_the_t5_base_shape_equals_peft(name):
    method = METHODS[name]
    if not peft_format.holds(method.config()):
        pytest.skip(f"peft has no {name}: no count to compare with")
    ours = build_t5("t5-base", device="meta")
    data = {**to_peft_config(method.config(), ours), "inference_mode": False}
    theirs = peft.get_peft_model(copy.deepcopy(ours), peft.PeftConfig.from_peft_type(**data))
    peftcore.inject(ours, method.config())
    factor = peft_format.for_config(method.config()).trainable_factor
    assert peftcore.count_parameters(ours).trainable * factor == theirs.get_nb_trainable_parameters()[0]


def bad_value(annotation):
    """A value no config field of this type accepts, or None when the type admits anything."""
    if annotation is int:
        return -1
    if annotation is float:
        return -1.0
    text = str(annotation)
    if "TargetModules" in text or "tuple[str" in text:
        return "(("  # not a regular expression
    if text.startswith("dict"):
        return ["not", "a", "mapping"]
    return None


@pytest.mark.parametrize("name", METHODS)
def test_bad_configs_are_refused_by_name(name):
    cls = METHODS[name].config
    hints = typing.get_type_hints(cls)
    checked = 0
    for field in dataclasses.fields(cls):
        value = bad_value(hints[field.name]) if field.name != "init" else "no-such-init"
        if value is None:
            continue
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field.name}\b"):
            cls(**{field.name: value})
        checked += 1
    assert checked >= 2, f"{cls.__name__}: too few fields with a checkable type"


def test_no_file_outside_a_methods_module_names_its_classes():
    """Surgery, checkpoints, stats, the CLI and the experiments iterate peftcore.methods; only a
    method's module, its translator in peftcore.peft_format and the registries (the package's
    exports, METHODS, FORMATS) name its classes. The test reads the code (names in expressions and
    imports, not prose)."""
    modules = [sys.modules[type(method).__module__] for method in methods.METHODS]
    names = {name for module in modules for name in module.__all__}
    translators = [sys.modules[type(translator).__module__] for translator in peft_format.FORMATS.values()]
    registries = [peftcore, methods, peft_format]
    own = {Path(module.__file__).resolve() for module in [*modules, *translators, *registries]}
    offenders = []
    for path in [*(ROOT / "peftcore").rglob("*.py"), *(ROOT / "experiments").glob("*.py")]:
        if path.resolve() in own:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            found = (
                node.id
                if isinstance(node, ast.Name)
                else node.attr
                if isinstance(node, ast.Attribute)
                else None
            )
            imported = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in [found, *imported] if n in names]
    assert not offenders, offenders
