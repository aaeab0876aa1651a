//! On-wire enums written down once: each variant with its value, and the decoder from that
//! value generated from the same list (the replication protocol's and NVMe/TCP's codes).

/// `wire_enum! { /// docs  pub enum Name: u8 { A = 1, B = 2 } }` declares the enum (`Debug`,
/// `Clone`, `Copy`, `PartialEq`, `Eq`, `#[repr]`) and `Name::from_repr(value) -> Option<Name>`.
#[macro_export]
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : $repr:ty {
            $($(#[$variant_meta:meta])* $variant:ident = $value:expr),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr($repr)]
        $vis enum $name {
            $($(#[$variant_meta])* $variant = $value),+
        }

        impl $name {
            /// The variant with this on-wire value, if any.
            pub const fn from_repr(value: $repr) -> Option<Self> {
                $(if value == $value {
                    return Some(Self::$variant);
                })+
                None
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::wire_enum! {
        /// A test enum with a gap in its values.
        enum Sample: u16 {
            One = 1,
            Three = 3,
        }
    }

    #[test]
    fn every_value_decodes_to_its_variant_and_others_to_none() {
        assert_eq!(Sample::from_repr(1), Some(Sample::One));
        assert_eq!(Sample::from_repr(3), Some(Sample::Three));
        assert_eq!(Sample::from_repr(Sample::Three as u16), Some(Sample::Three));
        assert_eq!(Sample::from_repr(2), None);
        assert_eq!(Sample::from_repr(0), None);
    }
}
