"""The ``av_hubert`` criterion: cross-entropy on masked (and optionally unmasked) frames, plus
weighted extra losses (the front-end feature penalty)."""
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass


@dataclass
class AVHubertCriterionConfig(FairseqDataclass):
    pred_masked_weight: float = field(default=1.0, metadata={"help": "weight of the masked-frame loss"})
    pred_nomask_weight: float = field(default=0.0, metadata={"help": "weight of the unmasked-frame loss"})
    loss_weights: Optional[List[float]] = field(
        default=None, metadata={"help": "weights of the model's extra losses (features_pen)"}
    )
    log_keys: List[str] = field(default_factory=lambda: [], metadata={"help": "net_output keys to log"})


@register_criterion("av_hubert", dataclass=AVHubertCriterionConfig)
class AVHubertCriterion(FairseqCriterion):
    def __init__(self, task, pred_masked_weight, pred_nomask_weight, loss_weights=None, log_keys=None):
        super().__init__(task)
        self.pred_masked_weight = pred_masked_weight
        self.pred_nomask_weight = pred_nomask_weight
        self.loss_weights = list(loss_weights) if loss_weights is not None else None
        self.log_keys = [] if log_keys is None else list(log_keys)

    def _prediction_loss(self, logits_list, targets_list, reduction, tag, logging_output):
        losses = []
        for i, (logits, targets) in enumerate(zip(logits_list, targets_list)):
            loss = F.cross_entropy(logits, targets, reduction=reduction)
            losses.append(loss)
            logging_output[f"loss_{tag}_{i}"] = loss.detach().item()
        return losses

    def forward(self, model, sample, reduce=True, log_pred=False):
        net_output = model(target_list=sample["target_list"], **sample["net_input"])
        reduction = "sum" if reduce else "none"
        loss = 0.0
        sample_size = 0
        logging_output = {}

        logits_m, targets_m = net_output["logit_m_list"], net_output["target_m_list"]
        losses_m = self._prediction_loss(logits_m, targets_m, reduction, "m", logging_output)
        if self.pred_masked_weight > 0:
            loss = loss + self.pred_masked_weight * sum(losses_m)
            sample_size += targets_m[0].numel()

        logits_u, targets_u = net_output["logit_u_list"], net_output["target_u_list"]
        losses_u = self._prediction_loss(logits_u, targets_u, reduction, "u", logging_output)
        if self.pred_nomask_weight > 0:
            loss = loss + self.pred_nomask_weight * sum(losses_u)
            sample_size += targets_u[0].numel()

        if self.loss_weights is not None:
            extra_losses, names = model.get_extra_losses(net_output)
            if torch.is_tensor(extra_losses):
                extra_losses, names = [extra_losses], [names]
            weights = self.loss_weights
            if len(weights) == 1 and len(extra_losses) != 1:
                weights = weights * len(extra_losses)
            if len(weights) != len(extra_losses):
                raise ValueError(f"criterion.loss_weights has {len(weights)} values for "
                                 f"{len(extra_losses)} extra losses {names}")
            for value, name, coef in zip(extra_losses, names, weights):
                if coef != 0 and value is not None:
                    # the penalty is a mean; scale it like the summed prediction losses
                    value = coef * value.float() * sample_size
                    loss = loss + value
                    logging_output[f"loss_{name}"] = value.item()

        if not torch.is_tensor(loss):  # no active term: keep a graph-connected zero
            loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)

        logging_output = {
            "loss": loss.item() if reduce else loss,
            "ntokens": sample_size,
            "nsentences": sample["id"].numel(),
            "sample_size": sample_size,
            **logging_output,
        }
        for key in self.log_keys:
            if key in net_output:
                logging_output[key] = float(net_output[key])

        with torch.no_grad():
            for tag, logits_list, targets_list in (("m", logits_m, targets_m), ("u", logits_u, targets_u)):
                for i, (logits, targets) in enumerate(zip(logits_list, targets_list)):
                    if logits.numel() == 0:
                        correct, count = 0, 0
                    else:
                        correct = (logits.argmax(-1) == targets).sum().item()
                        count = targets.numel()
                    logging_output[f"correct_{tag}_{i}"] = correct
                    logging_output[f"count_{tag}_{i}"] = count
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        """Aggregate logging outputs from data parallel training (all values are sums)."""
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        denom = max(sample_size, 1)
        metrics.log_scalar("loss", loss_sum / denom / math.log(2), sample_size, round=3)
        if sample_size != ntokens:
            metrics.log_scalar("nll_loss", loss_sum / max(ntokens, 1) / math.log(2), ntokens, round=3)
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        else:
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["loss"].avg))

        keys = set().union(*[log.keys() for log in logging_outputs]) if logging_outputs else set()
        counts = {}
        for key in keys:
            if key.startswith("count_"):
                counts[key] = sum(log.get(key, 0) for log in logging_outputs)
                metrics.log_scalar(key, counts[key])
        for key in keys:
            value = sum(log.get(key, 0) for log in logging_outputs)
            if key.startswith("loss_"):
                metrics.log_scalar(key, value / denom / math.log(2), round=3)
            elif key.startswith("correct_"):
                count = counts.get("count_" + key[len("correct_"):], 0)
                metrics.log_scalar("acc_" + key[len("correct_"):], value / count if count else 0.0)

    def logging_outputs_can_be_summed(self) -> bool:
        # Every entry is a sum (losses, token counts, correct/count), so fairseq may all-reduce
        # them: that is also the only aggregation path that works for CPU (gloo) training.
        return True
