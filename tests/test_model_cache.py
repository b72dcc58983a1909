"""``models.cache``: the KV-cache argument under the name the model's forward takes (``cache`` in newer transformers,
``past_key_values`` in 5.2), and the cache read back from either output field."""

from iqstar_lite.models.cache import cache_kwargs, output_cache


class Old:  # transformers 5.2's forward
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return None


class New:  # transformers 5.25's forward
    def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
        return None


class Wrapped:  # a peft model: its own forward takes **kwargs; the base's decides
    def __init__(self, base):
        self.base = base

    def forward(self, *args, **kwargs):
        return None

    def get_base_model(self):
        return self.base


def test_the_name_the_forward_takes():
    kv = object()
    assert cache_kwargs(Old(), kv) == {"past_key_values": kv}
    assert cache_kwargs(New(), kv) == {"cache": kv}
    assert cache_kwargs(Wrapped(Old()), kv) == {"past_key_values": kv}
    assert cache_kwargs(Wrapped(New()), kv) == {"cache": kv}


def test_the_cache_from_either_output_field():
    kv = object()
    assert output_cache({"logits": 1, "cache": kv}) is kv
    assert output_cache({"logits": 1, "past_key_values": kv}) is kv
