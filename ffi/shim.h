/* What bindgen cannot express: accessors for SPDK's inline functions and unions, and the bdev
 * module registration macro. Every function here is a few lines of C over SPDK's own API. */
#ifndef NVMIRROR_SPDK_SHIM_H
#define NVMIRROR_SPDK_SHIM_H

#include "spdk/stdinc.h"
#include "spdk/bdev_module.h"

/* The read/write/zeroes fields of a bdev I/O (a union member in SPDK's struct). */
struct nvmirror_bdev_io_rw {
	uint8_t type;
	struct iovec *iovs;
	int iovcnt;
	uint64_t offset_blocks;
	uint64_t num_blocks;
};
void nvmirror_bdev_io_rw(struct spdk_bdev_io *bdev_io, struct nvmirror_bdev_io_rw *out);

/* The bdev module "nvmirror" (SPDK_BDEV_MODULE_REGISTER registers it when the program loads).
 * Its callbacks are set by the runtime before the app starts; unset ones do nothing.
 * examine_config sees every bdev SPDK registers; the shim reports the module's examination
 * done after it returns, as SPDK requires. */
struct nvmirror_module_callbacks {
	int (*module_init)(void);
	void (*module_fini)(void);
	int (*config_json)(struct spdk_json_write_ctx *w);
	void (*examine_config)(struct spdk_bdev *bdev);
};
struct spdk_bdev_module *nvmirror_bdev_module(void);
void nvmirror_set_module_callbacks(const struct nvmirror_module_callbacks *callbacks);

/* The bdev behind an I/O's context pointer (bdev->ctxt), and the I/O's per-module context. */
void *nvmirror_bdev_io_ctxt(struct spdk_bdev_io *bdev_io);
void *nvmirror_bdev_io_driver_ctx(struct spdk_bdev_io *bdev_io);
/* Bytes of per-I/O context the module asks for (in nvmirror_bdev_io_driver_ctx). */
#define NVMIRROR_BDEV_IO_CTX_BYTES 8
/* spdk_io_channel_get_ctx, a static inline function. */
void *nvmirror_io_channel_get_ctx(struct spdk_io_channel *ch);

/* SPDK's version string ("SPDK v26.09-pre"), a macro. */
const char *nvmirror_spdk_version(void);

#endif
