//! Values kept per key and made on first use, such as one lock per tenant or pod: a map under a
//! tokio mutex, from which a caller takes its key's shared value and holds that, not the map.

use std::{collections::HashMap, sync::Arc};

/// The value of `key` in `map`, made (by `Default`) if there is none yet.
pub async fn entry<T: Default>(
    map: &tokio::sync::Mutex<HashMap<String, Arc<T>>>,
    key: &str,
) -> Arc<T> {
    map.lock().await.entry(key.to_string()).or_default().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_key_gives_one_value_and_keys_are_apart() {
        let m: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>> =
            tokio::sync::Mutex::default();
        let a = entry(&m, "a").await;
        assert!(Arc::ptr_eq(&a, &entry(&m, "a").await));
        let _held = a.lock().await;
        // Another key's lock is free while a's is held.
        assert!(entry(&m, "b").await.try_lock().is_ok());
        assert!(entry(&m, "a").await.try_lock().is_err());
    }
}
