//! The consistency-point planner (claims 1, 2, 7, 9, 11, 13): turns a CP's dirty map into the
//! descriptors the destination applies to its mirror namespace. A wholly overwritten block
//! becomes a [`Descriptor::Reference`] (transfer ID + block number: the destination copies it out
//! of its own log); a partially written one travels as [`Descriptor::Data`]; a wholly zeroed one
//! as [`Descriptor::Zeroes`]. In [`CpMode::Naive`] every dirty block is Data (the baseline the
//! references are measured against).

use crate::geometry::{DESCRIPTORS_PER_TABLE, TABLE_DATA_BLOCKS_MAX};
use crate::transfer::{BufferDescriptor, DirtyMap, TransferId, TransferTable};

/// How a CP mirrors wholly overwritten blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpMode {
    /// Wholly overwritten blocks travel as references (the patent's method).
    References,
    /// Every dirty block travels as data.
    Naive,
}

impl CpMode {
    /// A dirty block with this descriptor travels as Data, read from the primary at CP time.
    pub fn reads_primary(self, buffer: BufferDescriptor) -> bool {
        match self {
            CpMode::Naive => true,
            CpMode::References => buffer == BufferDescriptor::Partial,
        }
    }
}

/// How one dirty block reaches the mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Descriptor {
    /// Copy block `block_number` of transfer `transfer_id` out of the destination's log.
    Reference {
        transfer_id: TransferId,
        block_number: u32,
    },
    /// The block's 4 KiB follow in the message.
    Data,
    /// The block is zero.
    Zeroes,
}

/// A descriptor and the mirror block it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorEntry {
    pub nsid: u32,
    pub block_index: u64,
    pub descriptor: Descriptor,
}

/// The next run of descriptors that fits one DescriptorTable message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableExtent {
    pub first: usize,
    pub count: usize,
    pub data_blocks: usize,
}

/// One CP's descriptor emission: a cursor over the dirty map.
#[derive(Debug)]
pub struct ConsistencyPoint {
    pub cp_number: u64,
    pub mode: CpMode,
    next_index: usize,
}

impl ConsistencyPoint {
    pub fn new(cp_number: u64, mode: CpMode) -> Self {
        Self {
            cp_number,
            mode,
            next_index: 0,
        }
    }

    /// The descriptor of dirty block `index`.
    pub fn plan(
        &self,
        dirty: &DirtyMap,
        transfers: &TransferTable,
        index: usize,
    ) -> DescriptorEntry {
        let (nsid, block_index, buffer) = dirty.get(index);
        let descriptor = match (self.mode, buffer) {
            (CpMode::Naive, _) | (CpMode::References, BufferDescriptor::Partial) => {
                Descriptor::Data
            }
            (CpMode::References, BufferDescriptor::Zeroes) => Descriptor::Zeroes,
            (
                CpMode::References,
                BufferDescriptor::Whole {
                    table_index,
                    block_number,
                },
            ) => Descriptor::Reference {
                transfer_id: transfers.get(table_index).id,
                block_number,
            },
        };
        DescriptorEntry {
            nsid,
            block_index,
            descriptor,
        }
    }

    /// The next table's extent, or None when every descriptor was emitted.
    pub fn next_table(&self, dirty: &DirtyMap, transfers: &TransferTable) -> Option<TableExtent> {
        if self.next_index == dirty.len() {
            return None;
        }
        let mut extent = TableExtent {
            first: self.next_index,
            count: 0,
            data_blocks: 0,
        };
        while extent.first + extent.count < dirty.len() && extent.count < DESCRIPTORS_PER_TABLE {
            let entry = self.plan(dirty, transfers, extent.first + extent.count);
            if entry.descriptor == Descriptor::Data {
                if extent.data_blocks == TABLE_DATA_BLOCKS_MAX {
                    break;
                }
                extent.data_blocks += 1;
            }
            extent.count += 1;
        }
        Some(extent)
    }

    /// Marks an extent as emitted.
    pub fn advance(&mut self, extent: &TableExtent) {
        assert_eq!(extent.first, self.next_index);
        self.next_index += extent.count;
    }

    /// Descriptors emitted so far.
    pub fn emitted(&self) -> usize {
        self.next_index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::{LoggedWrite, TransferRecord};

    fn setup() -> (DirtyMap, TransferTable) {
        let mut transfers = TransferTable::with_capacity(4);
        let record = TransferRecord {
            id: TransferId(41),
            first_seq: 1,
            first_slot: 0,
            entry_count: 3,
            data_bytes: 3 * 4096,
            base_offset: 0,
        };
        let index = transfers.push(record);
        let mut dirty = DirtyMap::with_capacity(4096);
        let whole = LoggedWrite {
            nsid: 1,
            lba: 8,
            length_bytes: 4096,
            zeroes: false,
            table_index: index,
            offset_in_transfer: 4096,
        };
        dirty.note_write(&whole).unwrap();
        dirty
            .note_write(&LoggedWrite {
                lba: 0,
                length_bytes: 512,
                offset_in_transfer: 0,
                ..whole
            })
            .unwrap();
        dirty
            .note_write(&LoggedWrite {
                lba: 16,
                zeroes: true,
                ..whole
            })
            .unwrap();
        dirty.settle();
        (dirty, transfers)
    }

    #[test]
    fn references_for_whole_blocks_data_for_partial() {
        let (dirty, transfers) = setup();
        let cp = ConsistencyPoint::new(3, CpMode::References);
        let planned: Vec<_> = (0..dirty.len())
            .map(|i| cp.plan(&dirty, &transfers, i))
            .collect();
        assert_eq!(
            planned,
            vec![
                DescriptorEntry {
                    nsid: 1,
                    block_index: 1,
                    descriptor: Descriptor::Reference {
                        transfer_id: TransferId(41),
                        block_number: 1
                    }
                },
                DescriptorEntry {
                    nsid: 1,
                    block_index: 0,
                    descriptor: Descriptor::Data
                },
                DescriptorEntry {
                    nsid: 1,
                    block_index: 2,
                    descriptor: Descriptor::Zeroes
                },
            ]
        );
        let naive = ConsistencyPoint::new(3, CpMode::Naive);
        assert!((0..3).all(|i| naive.plan(&dirty, &transfers, i).descriptor == Descriptor::Data));
    }

    #[test]
    fn tables_respect_data_block_limit() {
        let mut transfers = TransferTable::with_capacity(1);
        transfers.push(TransferRecord {
            id: TransferId(1),
            first_seq: 1,
            first_slot: 0,
            entry_count: 1,
            data_bytes: 512,
            base_offset: 0,
        });
        let mut dirty = DirtyMap::with_capacity(4096);
        for block in 0..(TABLE_DATA_BLOCKS_MAX as u64 * 2 + 5) {
            let partial = LoggedWrite {
                nsid: 1,
                lba: block * 8,
                length_bytes: 512,
                zeroes: false,
                table_index: 0,
                offset_in_transfer: 0,
            };
            dirty.note_write(&partial).unwrap();
        }
        dirty.settle();
        let mut cp = ConsistencyPoint::new(1, CpMode::References);
        let mut extents = Vec::new();
        while let Some(extent) = cp.next_table(&dirty, &transfers) {
            cp.advance(&extent);
            extents.push(extent);
        }
        assert_eq!(extents.len(), 3);
        assert_eq!(
            extents[0],
            TableExtent {
                first: 0,
                count: TABLE_DATA_BLOCKS_MAX,
                data_blocks: TABLE_DATA_BLOCKS_MAX
            }
        );
        assert_eq!(extents[2].count, 5);
        assert_eq!(cp.emitted(), dirty.len());
    }
}
