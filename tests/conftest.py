import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# the 1,000 real ImageNet images this repository's own runs use;
# a fork without them skips the tests that read them
IMAGENET_SAMPLES = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'imagenet_1k_samples')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: runs a training, sampling or evaluation script in a '
                                       'subprocess; `python -m pytest -q -m "not slow"` skips them for a '
                                       'quick edit-test loop')


@pytest.fixture
def imagenet_samples():
    if not os.path.isdir(IMAGENET_SAMPLES):
        pytest.skip(f"needs the ImageNet sample folder {IMAGENET_SAMPLES} (not part of the repository)")
    return IMAGENET_SAMPLES


@pytest.fixture(scope='module')
def one_torch_thread():
    """For modules of tiny models: one intra-op thread is faster than two fighting over CI's 2 cores.
    Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def graph_counter():
    """A dynamo backend that records every graph it is given and runs it as it is (no codegen: seconds on
    the CPU), and that list; dynamo's caches are reset first so earlier tests' graphs do not count."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return backend, graphs


def make_image_folder(root, per_class, size, classes=('a', 'b'), seed=0):
    """A tiny ImageFolder of random RGB PNGs: root/<class>/<i>.png."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c))
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                os.path.join(root, c, f'{i}.png'))
    return root
