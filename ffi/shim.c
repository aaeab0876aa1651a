/* See shim.h. */
#include "shim.h"
#include "spdk/version.h"
#include "spdk/thread.h"

void
nvmirror_bdev_io_rw(struct spdk_bdev_io *bdev_io, struct nvmirror_bdev_io_rw *out)
{
	out->type = bdev_io->type;
	out->iovs = bdev_io->u.bdev.iovs;
	out->iovcnt = bdev_io->u.bdev.iovcnt;
	out->offset_blocks = bdev_io->u.bdev.offset_blocks;
	out->num_blocks = bdev_io->u.bdev.num_blocks;
}

static struct nvmirror_module_callbacks g_callbacks;
static struct spdk_bdev_module nvmirror_if;

void
nvmirror_set_module_callbacks(const struct nvmirror_module_callbacks *callbacks)
{
	g_callbacks = *callbacks;
}

static int
module_init(void)
{
	return g_callbacks.module_init ? g_callbacks.module_init() : 0;
}

static void
module_fini(void)
{
	if (g_callbacks.module_fini) {
		g_callbacks.module_fini();
	}
}

static int
module_config_json(struct spdk_json_write_ctx *w)
{
	return g_callbacks.config_json ? g_callbacks.config_json(w) : 0;
}

static void
module_examine_config(struct spdk_bdev *bdev)
{
	if (g_callbacks.examine_config) {
		g_callbacks.examine_config(bdev);
	}
	spdk_bdev_module_examine_done(&nvmirror_if);
}

static int
module_get_ctx_size(void)
{
	return NVMIRROR_BDEV_IO_CTX_BYTES;
}

void *
nvmirror_bdev_io_ctxt(struct spdk_bdev_io *bdev_io)
{
	return bdev_io->bdev->ctxt;
}

void *
nvmirror_bdev_io_driver_ctx(struct spdk_bdev_io *bdev_io)
{
	return bdev_io->driver_ctx;
}

void *
nvmirror_io_channel_get_ctx(struct spdk_io_channel *ch)
{
	return spdk_io_channel_get_ctx(ch);
}

static struct spdk_bdev_module nvmirror_if = {
	.name = "nvmirror",
	.module_init = module_init,
	.module_fini = module_fini,
	.config_json = module_config_json,
	.examine_config = module_examine_config,
	.get_ctx_size = module_get_ctx_size,
};

SPDK_BDEV_MODULE_REGISTER(nvmirror, &nvmirror_if)

struct spdk_bdev_module *
nvmirror_bdev_module(void)
{
	return &nvmirror_if;
}

const char *
nvmirror_spdk_version(void)
{
	return SPDK_VERSION_STRING;
}
