"""The vocabulary-sized parts of the training step give stock PyTorch's loss and gradients (vocab_gradients)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgvqa.core.config import load_config
from surgvqa.models.loading import load_model, load_processor
from surgvqa.training.dataset import TrainingCollator, VQADataset
from surgvqa.training.trainer import (
    SupervisedOnlyTrainer,
    build_model_for_training,
    supervised_only_loss,
    training_arguments,
)
from surgvqa.training.vocab_gradients import route_tied_embedding_rows, summed_cross_entropy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_summed_cross_entropy_gives_torchs_loss_and_gradient(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 5000, generator=generator, dtype=dtype) * 4).requires_grad_()
    targets = torch.randint(0, 5000, (9,), generator=generator)
    reference = F.cross_entropy(logits, targets, reduction="sum")
    (reference * 0.37).backward()
    reference_grad = logits.grad.clone()
    logits.grad = None
    loss = summed_cross_entropy(logits, targets)
    (loss * 0.37).backward()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert loss.item() == pytest.approx(reference.item(), rel=tolerance)
    assert torch.allclose(logits.grad, reference_grad, atol=tolerance)


def test_summed_cross_entropy_of_no_rows_is_zero_and_rejects_other_shapes():
    logits = torch.zeros(0, 10, requires_grad=True)
    loss = summed_cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and logits.grad.shape == (0, 10)
    with pytest.raises(ValueError, match=r"logits \(rows, vocab\)"):
        summed_cross_entropy(torch.zeros(2, 3, 10), torch.zeros(2, 3, dtype=torch.long))


class TiedToy(nn.Module):
    """An embedding tied to its output layer, with a padding row, whose loss reads every looked-up row."""

    def __init__(self, tied: bool = True):
        super().__init__()
        self.embed = nn.Embedding(50, 8, padding_idx=0)
        self.head = nn.Linear(8, 50, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids))).logsumexp(-1).sum()


def _accumulated_grads(model, batches):
    model.zero_grad(set_to_none=True)
    for ids in batches:
        model(ids).backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def test_tied_rows_give_the_stock_gradient_with_padding_repeats_and_accumulation():
    torch.manual_seed(0)
    model = TiedToy()
    batches = [torch.tensor([[0, 3, 3, 7], [9, 0, 3, 49]]), torch.tensor([[7, 7, 0, 1]])]
    stock = _accumulated_grads(model, batches)
    assert stock["embed.weight"][0].abs().sum() > 0  # the LM head's share of the padding row stays
    handle = route_tied_embedding_rows(model)
    assert handle is not None
    assert model.embed(batches[0]).is_leaf  # the lookup is cut from the weight: the rows take the other path
    routed = _accumulated_grads(model, batches)
    assert torch.allclose(routed["embed.weight"], stock["embed.weight"], atol=1e-6)
    handle.remove()
    assert _accumulated_grads(model, batches)["embed.weight"].equal(stock["embed.weight"])


def test_tied_rows_are_left_off_where_the_weight_is_not_shared_or_not_trained():
    assert route_tied_embedding_rows(TiedToy(tied=False)) is None
    frozen = TiedToy()
    frozen.embed.weight.requires_grad_(False)
    assert route_tied_embedding_rows(frozen) is None
    unrouted = TiedToy()
    unrouted.embed.scale_grad_by_freq = True
    assert route_tied_embedding_rows(unrouted) is None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tied_rows_on_the_tiny_qwen2_vl_give_its_stock_gradients(checkpointing, tiny_model_dir, prepared_demo):
    config = load_config(None, [f"model.gradient_checkpointing={str(checkpointing).lower()}"])
    processor = load_processor(str(tiny_model_dir), config.model)
    model = load_model(str(tiny_model_dir), config, processor)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert model.is_gradient_checkpointing == checkpointing
    model.train()
    dataset = VQADataset.from_jsonl(prepared_demo / "train.jsonl", processor, config.prompt, config.masking, limit=6)
    collate = TrainingCollator(processor.tokenizer.pad_token_id)
    batches = [collate([dataset[i] for i in range(4)]), collate([dataset[i] for i in range(4, 6)])]

    def grads():
        model.zero_grad(set_to_none=True)
        for batch in batches:
            batch = dict(batch)
            labels = batch.pop("labels")
            supervised_only_loss(model, batch, labels, num_items_in_batch=40)[0].backward()
        return {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                if parameter.grad is not None}

    stock = grads()
    handle = route_tied_embedding_rows(model)
    routed = grads()
    handle.remove()
    assert stock.keys() == routed.keys()
    for name in stock:
        assert torch.allclose(routed[name], stock[name], atol=1e-6), name


def test_the_trainer_routes_the_rows_during_training_only(tiny_model_dir, prepared_demo, tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}"])
    processor = load_processor(str(tiny_model_dir), config.model)
    model = build_model_for_training(config, str(tiny_model_dir), processor)
    dataset = VQADataset.from_jsonl(prepared_demo / "train.jsonl", processor, config.prompt, config.masking, limit=4)
    embedding = model.get_input_embeddings()
    seen_hooks = []

    class Probe(SupervisedOnlyTrainer):
        def training_step(self, *args, **kwargs):
            seen_hooks.append(len(embedding._forward_hooks))
            return super().training_step(*args, **kwargs)

    args = training_arguments(config, tmp_path / "checkpoints", max_steps=2, batch_size=2, save=False,
                              report_tensorboard=False)
    Probe(model=model, args=args, train_dataset=dataset,
          data_collator=TrainingCollator(processor.tokenizer.pad_token_id)).train()
    assert seen_hooks == [1, 1]
    assert not embedding._forward_hooks

