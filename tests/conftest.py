import pytest
import torch

# Torchvision models the core must handle (the list); small inputs keep tests fast.
TORCHVISION = ["torchvision:resnet18", "torchvision:resnet34", "torchvision:resnet50", "torchvision:mobilenet_v2",
               "torchvision:vgg16_bn"]


def input_for(name: str, n: int = 2) -> torch.Tensor:
    size = 64 if name.startswith("torchvision:") else 32
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, as in a trained model."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread: tiny models gain nothing from more, and CI shares its cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
