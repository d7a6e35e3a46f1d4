"""Prefix-shared training batches (issue 4, "compute only what a loss needs").

The contextualized segment samples and the QA samples of one document all start with
the same prompt head and truncated context; only the head/tail split differs (drawn per
sample). With prefix sharing, a document's samples in one step use ONE split (a fresh
one each step: the seed of the step's first planned sample, `shared_context_refs`), so
they share a token prefix. That prefix is run through the model once per step and pass;
every sample's remainder attends to its key/value states, as cascade attention does in
serving:

    prefix pass   ids  [G, P_max]   one row per document (right-padded), cache kept with grad
    suffix pass   ids  [B, S_max]   sample i from position P_g(i); positions P_g(i) + j (RoPE);
                  keys = [prefix keys of its document (rows gathered), own keys]; mask hides the
                  document's prefix padding and the suffix padding; causal by cache index

The prefix P_g is the longest common prefix of the group's samples, cut so that no
position in it predicts a labelled token; so the loss positions are all in the suffix
pass and the result is the same loss and the same gradients as running every full
sample (`plain_token_loss`) — tested. Linear-layer FLOPs fall from Σ_i |x_i| to
Σ_g P_g + Σ_i (|x_i| − P_g); attention still reads every key it did before.

A sample that does not start with its document's context — an anchor sample, whose
prompt is a 512-token chunk (samples.py) — would cut the document's common prefix down
to the chat template's header and pad every suffix to its length. So a document's
samples are first clustered (`prefix_passes`): a sample joins the first cluster for which
sharing costs fewer tokens than running it apart — cost(cluster) = P + n · max suffix,
the tokens its prefix and padded suffix passes compute —; the k-th largest cluster of
every document goes through the k-th shared pass, and the samples that share with no
other go through one plain pass. Each sample's token losses are still computed once,
exactly as alone.

Needs a cache-aware forward, so a step planned with gradient checkpointing (HF disables
the cache under it) falls back to the plain computation of the same samples.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from lift_engine.batch.forward import plain_token_loss, sample_token_losses, training_attention_mask
from lift_engine.batch.loss import loss_positions
from lift_engine.models.loading import model_device
from lift_engine.samples import IGNORE_INDEX, Sample, SampleRef


def shared_context_refs(refs: list[SampleRef]) -> list[SampleRef]:
    """The step's refs with one context split for the whole document step."""
    if not refs:
        return refs
    seed = refs[0].seed
    return [SampleRef(r.kind, r.index, seed) for r in refs]


def shared_prefix_length(group: list[Sample]) -> int:
    """Longest common prefix of the group's ids in which no position predicts a label."""
    first = group[0].input_ids
    limit = min(len(s.input_ids) for s in group) - 1  # every sample keeps ≥ 1 suffix token
    n = 0
    while n < limit and all(s.input_ids[n] == first[n] for s in group):
        n += 1
    for s in group:  # position t predicts token t+1: labels[1..P] must carry no loss
        first_label = next((i for i, lab in enumerate(s.labels) if lab != IGNORE_INDEX), len(s.labels))
        n = min(n, max(0, first_label - 1))
    return max(0, n)


def shared_pass_tokens(group: list[Sample]) -> int:
    """Tokens a prefix pass and a padded suffix pass compute for `group`: P + n · max suffix."""
    p = shared_prefix_length(group)
    return p + len(group) * max(len(s.input_ids) - p for s in group)


def prefix_passes(samples: list[Sample]) -> tuple[list[list[Sample]], list[Sample]]:
    """(shared passes, alone): the step's samples clustered per document — a sample joins
    the first cluster where `shared_pass_tokens` grows by less than the sample's own
    length —, the k-th largest cluster of every document in shared pass k, and the
    samples that share with no other. Every sample is in exactly one place."""
    clusters: dict[int, list[list[Sample]]] = {}
    for s in samples:
        groups = clusters.setdefault(s.doc, [])
        for group in groups:
            if shared_pass_tokens(group + [s]) < shared_pass_tokens(group) + len(s.input_ids):
                group.append(s)
                break
        else:
            groups.append([s])
    alone = [g[0] for groups in clusters.values() for g in groups if len(g) == 1]
    shared = {doc: sorted((g for g in groups if len(g) > 1), key=len, reverse=True) for doc, groups in clusters.items()}
    passes = []
    for k in range(max((len(g) for g in shared.values()), default=0)):
        passes.append([s for doc in sorted(shared) if k < len(shared[doc]) for s in shared[doc][k]])
    return passes, alone


def prefix_shared_token_loss(model, handle, samples: list[Sample], pad_id: int, chunk: int):
    """Same contract as forward.plain_token_loss: (token_loss [T], token_docs [T], tokens
    computed). The token losses come per pass of `prefix_passes`, concatenated (the
    caller sums them per document)."""
    if getattr(model, "is_gradient_checkpointing", False):
        return plain_token_loss(model, handle, samples, pad_id, chunk)
    passes, alone = prefix_passes(samples)
    results = [shared_pass(model, handle, group, pad_id, chunk) for group in passes]
    if alone:
        results.append(plain_token_loss(model, handle, alone, pad_id, chunk))
    if len(results) == 1:
        return results[0]
    return (torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results]), sum(r[2] for r in results))


def shared_pass(model, handle, samples: list[Sample], pad_id: int, chunk: int):
    """One prefix pass and one suffix pass over samples that share a prefix per document."""
    slots = sorted({s.doc for s in samples})
    groups = {slot: [s for s in samples if s.doc == slot] for slot in slots}
    prefix_len = {slot: shared_prefix_length(g) for slot, g in groups.items()}
    p_max = max(prefix_len.values())
    if p_max == 0:
        return plain_token_loss(model, handle, samples, pad_id, chunk)
    decoder = model.get_decoder()
    device = model_device(model)

    # ---- prefix pass: one row per document
    g_ids = torch.full((len(slots), p_max), pad_id, dtype=torch.long)
    g_mask = torch.zeros((len(slots), p_max), dtype=torch.long)
    for row, slot in enumerate(slots):
        p = prefix_len[slot]
        g_ids[row, :p] = torch.tensor(groups[slot][0].input_ids[:p])
        g_mask[row, :p] = 1
    handle.set_indices(torch.tensor(slots).to(device))
    out = decoder(input_ids=g_ids.to(device), attention_mask=training_attention_mask(g_mask), use_cache=True)
    prefix_cache = out.past_key_values

    # ---- suffix pass: every sample after its document's prefix
    order = [s for slot in slots for s in groups[slot]]
    row_group = torch.tensor([slots.index(s.doc) for s in order])
    starts = [prefix_len[s.doc] for s in order]
    s_max = max(len(s.input_ids) - p for s, p in zip(order, starts))
    ids = torch.full((len(order), s_max), pad_id, dtype=torch.long)
    labels = torch.full((len(order), s_max + 1), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(order), s_max), dtype=torch.long)
    mask = torch.zeros((len(order), p_max + s_max), dtype=torch.long)
    for row, (s, p) in enumerate(zip(order, starts)):
        n = len(s.input_ids) - p
        ids[row, :n] = torch.tensor(s.input_ids[p:])
        # labels shifted so that column j+1 is the target of suffix position j (loss_positions convention)
        labels[row, 1 : n + 1] = torch.tensor(s.labels[p + 1 :] + [IGNORE_INDEX])[:n]
        positions[row] = p + torch.arange(s_max)
        mask[row, :p] = 1
        mask[row, p_max : p_max + n] = 1
    cache = DynamicCache()
    for layer_idx, (keys, values) in enumerate(_cache_layers(prefix_cache)):
        cache.update(keys.index_select(0, row_group.to(keys.device)), values.index_select(0, row_group.to(values.device)), layer_idx)
    docs = torch.tensor([s.doc for s in order]).to(device)
    handle.set_indices(docs)
    hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                     past_key_values=cache, use_cache=True).last_hidden_state
    rows, cols, targets = loss_positions(labels.to(device))  # looks at labels[:, 1:]: column j+1 ↔ suffix position j
    token_loss = sample_token_losses(hidden[rows, cols], model.get_output_embeddings(), targets, rows, order, chunk)
    used = int(g_ids.numel() + ids.numel())
    return token_loss, docs[rows], used


def _cache_layers(cache):
    """(keys, values) per layer of a transformers Cache, [B, H_kv, S, d] each."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]
