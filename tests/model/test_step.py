"""The model pieces composed the way the training loop uses them: draw, fetch, forward, loss, backward, update."""

import pytest
import torch

from pirl_trainer.model.losses import pirl_loss
from pirl_trainer.model.memory_bank import MemoryBank
from pirl_trainer.model.pirl import PIRLNet


@pytest.mark.parametrize("shared", [False, True])
def test_one_training_step(shared):
    num_data, batch, embed = 20, 4, 16
    net = PIRLNet("resnet18", embed_dim=embed).train()
    bank = MemoryBank(num_data, embed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    index = torch.tensor([3, 7, 0, 19])
    image, patches = torch.randn(batch, 3, 32, 32), torch.randn(batch, 9, 3, 16, 16)

    f_img, g_jig = net(image, patches)
    negatives = bank.draw_negatives(index, 8, shared=shared)
    out = pirl_loss(bank.fetch(index), g_jig, f_img, bank.fetch(negatives), num_data=num_data)
    before = net.trunk.conv1.weight.detach().clone()
    out["loss"].backward()
    opt.step()
    bank.update(index, f_img.detach())

    assert torch.isfinite(out["loss"])
    assert not torch.equal(before, net.trunk.conv1.weight)
    torch.testing.assert_close(bank.rows.norm(dim=1), torch.ones(num_data))
