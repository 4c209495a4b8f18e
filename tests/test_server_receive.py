"""The server accepts valid uploads, refuses bad ones with a reason, and keeps going."""

from __future__ import annotations

import math

import safetensors.torch
import torch

from crosslm.config import RunConfig
from crosslm.protocol import WireMessage, encode
from crosslm.server.server import CrossLMServer
from crosslm.task import LabelledTexts
from tests.conftest import TOY_TASK, make_classifier, make_upload

TASK = TOY_TASK


def _server() -> CrossLMServer:
    events: list[dict] = []
    srv = CrossLMServer(
        RunConfig(), TASK, None, None, LabelledTexts(), log=events.append, log_synthetic=events.append
    )
    return srv


def test_valid_upload_is_registered_with_staleness():
    srv = _server()
    srv.update = 2  # two server updates already happened; this client started from the pretrained model
    ev = srv.receive(encode(make_upload(make_classifier("bert", 100))), sender="client-0")
    assert ev["accepted"] and ev["staleness"] == 2 and ev["client"] == "client-0"
    assert srv.models["client-0"].label_counts == [3, 7] and srv.pending == ["client-0"]
    # weights survive the trip (fp16 on the wire)
    sent = make_classifier("bert", 100).state_dict()
    got = srv.models["client-0"].model.state_dict()
    assert all(torch.allclose(sent[k], got[k], atol=1e-2) for k in sent)


def test_bad_uploads_are_refused_and_the_server_goes_on():
    srv = _server()
    model = make_classifier("roberta", 100)
    nan_state = {k: v.clone() for k, v in model.state_dict().items()}
    nan_state["classifier.out_proj.weight"][0, 0] = math.nan
    honest = encode(make_upload(model))
    # a hostile sender skips encode()'s own NaN check and writes the payload itself
    nan_wire = WireMessage(honest.header, safetensors.torch.save(nan_state))
    ev = srv.receive(nan_wire, sender="client-0")
    assert not ev["accepted"] and "NaN" in ev["reason"], ev
    bad = [
        (make_upload(model, labels=["pos", "neg"]), "label"),
        (make_upload(model, slm="no/such-tokenizer-offline"), "tokenizer"),
        (make_upload(model, client_id="client-9"), "claims"),
    ]
    for msg, reason in bad:
        ev = srv.receive(encode(msg), sender="client-0")
        assert not ev["accepted"] and reason in ev["reason"], ev
    ev = srv.receive(encode(make_upload(model)), sender="client-0")
    assert ev["accepted"]  # control: an honest upload still goes through after refusals
    assert srv.pending == ["client-0"] and len(srv.models) == 1
