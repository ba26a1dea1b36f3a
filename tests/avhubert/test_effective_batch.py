"""update_freq from the recipe's world size (avhubert/effective_batch.py); the stage wiring is
tested in tests/e2e/test_train_stage.py and tests/finetune/test_finetune.py."""
import pytest
from omegaconf import OmegaConf

from avhubert.effective_batch import derive_update_freq, recipe_of


@pytest.mark.parametrize("ranks, update_freq, excess", [(1, 32, 0), (2, 16, 0), (3, 11, 1), (64, 1, 32)])
def test_update_freq_rounds_up_and_says_the_remainder(ranks, update_freq, excess):
    batch = derive_update_freq(32, 1, ranks)
    assert (batch.update_freq, batch.batches, batch.excess) == (update_freq, ranks * update_freq, excess)
    assert ("exactly" in batch.describe()) == (excess == 0)


def test_recipe_update_freq_multiplies_the_recipe_batch():
    assert derive_update_freq(8, 2, 3).update_freq == 6  # 16 batches on 3 ranks: 18
    assert derive_update_freq(8, 2, 3).excess == 2


def test_recipe_of_a_config_and_its_defaults():
    cfg = OmegaConf.create({"distributed_training": {"distributed_world_size": 32},
                            "optimization": {"update_freq": [2]}})
    assert recipe_of(cfg) == (32, 2)
    assert recipe_of(OmegaConf.create({})) == (1, 1)  # fairseq's defaults
    with pytest.raises(ValueError, match="one value per epoch"):
        recipe_of(OmegaConf.create({"optimization": {"update_freq": [1, 2]}}))
    with pytest.raises(ValueError, match="positive integer"):
        recipe_of(OmegaConf.create({"distributed_training": {"distributed_world_size": 0}}))
    with pytest.raises(ValueError, match="update_freq must be a positive integer"):
        derive_update_freq(32, 1, 4, override=0)
