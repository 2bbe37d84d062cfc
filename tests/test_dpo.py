"""Online DPO: the loss and its gradient on a hand-checked case, log-probabilities of responses."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learners import IGNORE, SFTExample, collate, tokenize
from learners.dpo import dpo_loss, response_logprobs


def test_dpo_loss_and_gradient_by_hand():
    # beta (1 - 0) = 0.5: loss = log(1 + e^-0.5); d loss / d log pi(c) = -beta sigmoid(-0.5)
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, stats = dpo_loss(pc, pr, torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)))
    loss.backward()
    expected = 0.5 / (1 + math.exp(0.5))
    assert pc.grad.item() == pytest.approx(-expected) and pr.grad.item() == pytest.approx(expected)
    assert stats["reward_margin"] == pytest.approx(0.5) and stats["reward_accuracy"] == 1.0
    # The reference's own preference is subtracted: the same ratio as the reference gives log 2.
    same, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-4.0]), 0.1)
    assert same.item() == pytest.approx(math.log(2))


def test_response_logprobs_sum_the_response_tokens_only(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompt = "<|im_start|>user\nYour task is to: look.<|im_end|>\n<|im_start|>assistant\n"
    examples = [tokenize(tokenizer, SFTExample(prompt, r)) for r in ("ACTION: look", "ACTION: go to shelf 1")]
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        got = response_logprobs(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                batch["labels"])
        for i, e in enumerate(examples):  # one at a time, token by token
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([e.input_ids])).logits[0], dim=-1)
            want = sum(logprobs[t - 1, e.input_ids[t]].item() for t in range(len(e.input_ids)) if e.labels[t] != IGNORE)
            assert got[i].item() == pytest.approx(want, abs=1e-4)
